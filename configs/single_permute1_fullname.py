"""bioS row `single_permute1_fullname`: pretrain -> QA finetune -> eval. Scale with `:tiny` / `:small`."""

from configs import base


def get_config(scale: str = "paper"):
  c = base.get_config(scale)
  c.name = "single_permute1_fullname"
  c.data.permute = True
  c.data.fullname = True
  return c
