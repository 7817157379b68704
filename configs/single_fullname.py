"""bioS row `single_fullname`: pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:small,mixed`, `:tiny,lora,probe` (configs/base.py)."""

from configs import base


def get_config(arg: str = "paper"):
  c = base.get_config(arg)
  c.name = "single_fullname"
  c.data.fullname = True
  return c
