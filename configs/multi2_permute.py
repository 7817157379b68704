"""bioS row `multi2_permute`: pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:small,mixed`, `:tiny,lora,probe` (configs/base.py)."""

from configs import base


def get_config(arg: str = "paper"):
  c = base.get_config(arg)
  c.name = "multi2_permute"
  c.data.multi = 2
  c.data.permute = True
  return c
