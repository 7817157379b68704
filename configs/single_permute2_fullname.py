"""bioS row `single_permute2_fullname`: pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:small,mixed`, `:tiny,lora,probe` (configs/base.py)."""

from configs import base


def get_config(arg: str = "paper"):
  c = base.get_config(arg)
  c.name = "single_permute2_fullname"
  c.data.permute = True
  c.data.permute_copies = 2
  c.data.fullname = True
  return c
