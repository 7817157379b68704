"""bioS row `single`: pretrain -> QA finetune -> eval. Scale with `:tiny` / `:small`."""

from configs import base


def get_config(scale: str = "paper"):
  c = base.get_config(scale)
  c.name = "single"
  return c
