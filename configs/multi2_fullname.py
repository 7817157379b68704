"""bioS row `multi2_fullname`: pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:small,mixed`, `:tiny,lora,probe` (configs/base.py)."""

from configs import base


def get_config(arg: str = "paper"):
  return base.row(arg, "multi2_fullname", multi=2, fullname=True)
