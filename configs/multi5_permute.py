"""bioS row `multi5_permute`: pretrain -> QA finetune -> eval. Scale with `:tiny` / `:small`."""

from configs import base


def get_config(scale: str = "paper"):
  c = base.get_config(scale)
  c.name = "multi5_permute"
  c.data.multi = 5
  c.data.permute = True
  return c
