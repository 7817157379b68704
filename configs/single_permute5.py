"""bioS row `single_permute5`: pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:small,mixed`, `:tiny,lora,probe` (configs/base.py)."""

from configs import base


def get_config(arg: str = "paper"):
  return base.row(arg, "single_permute5", permute=True, permute_copies=5)
