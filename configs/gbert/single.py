"""bioS row `single` with GBERT (bidirectional, whole-word masked LM): pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:tiny,mixed`, `:tiny,probe` (configs/base.py)."""

from configs import base, single


def get_config(arg: str = "paper"):
  return base.arch(single.get_config(arg), "gbert")
