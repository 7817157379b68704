"""bioS row `single_permute2_fullname`: pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:small,mixed`, `:tiny,lora,probe` (configs/base.py)."""

from configs import base


def get_config(arg: str = "paper"):
  return base.row(arg, "single_permute2_fullname", permute=True, permute_copies=2, fullname=True)
