"""bioS row `multi5_permute`: pretrain -> QA finetune -> eval. Scale and variants: `:tiny`, `:small,mixed`, `:tiny,lora,probe` (configs/base.py)."""

from configs import base


def get_config(arg: str = "paper"):
  c = base.get_config(arg)
  c.name = "multi5_permute"
  c.data.multi = 5
  c.data.permute = True
  return c
