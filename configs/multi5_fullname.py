"""bioS row `multi5_fullname`: pretrain -> QA finetune -> eval. Scale with `:tiny` / `:small`."""

from configs import base


def get_config(scale: str = "paper"):
  c = base.get_config(scale)
  c.name = "multi5_fullname"
  c.data.multi = 5
  c.data.fullname = True
  return c
