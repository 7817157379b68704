"""bioS row `multi2`: pretrain -> QA finetune -> eval. Scale with `:tiny` / `:small`."""

from configs import base


def get_config(scale: str = "paper"):
  c = base.get_config(scale)
  c.name = "multi2"
  c.data.multi = 2
  return c
