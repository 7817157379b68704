"""bioS row `multi5_permute_fullname`: pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:small,mixed`, `:tiny,lora,probe` (configs/base.py)."""

from configs import base


def get_config(arg: str = "paper"):
  return base.row(arg, "multi5_permute_fullname", multi=5, permute=True, fullname=True)
