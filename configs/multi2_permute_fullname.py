"""bioS row `multi2_permute_fullname`: pretrain -> QA finetune -> eval. Scale with `:tiny` / `:small`."""

from configs import base


def get_config(scale: str = "paper"):
  c = base.get_config(scale)
  c.name = "multi2_permute_fullname"
  c.data.multi = 2
  c.data.permute = True
  c.data.fullname = True
  return c
