"""bioS row `single_permute2`: pretrain -> QA finetune -> eval. Scale with `:tiny` / `:small`."""

from configs import base


def get_config(scale: str = "paper"):
  c = base.get_config(scale)
  c.name = "single_permute2"
  c.data.permute = True
  c.data.permute_copies = 2
  return c
