"""bioS row `multi5_permute` with GBERT (bidirectional, whole-word masked LM): pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:tiny,mixed`, `:tiny,probe` (configs/base.py)."""

from configs import base, multi5_permute


def get_config(arg: str = "paper"):
  return base.arch(multi5_permute.get_config(arg), "gbert")
