"""bioS row `single_fullname`: pretrain -> QA finetune -> eval. Scale with `:tiny` / `:small`."""

from configs import base


def get_config(scale: str = "paper"):
  c = base.get_config(scale)
  c.name = "single_fullname"
  c.data.fullname = True
  return c
