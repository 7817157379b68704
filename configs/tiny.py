"""The CPU demo setting (RESULTS.md): the multi5_permute row at the `tiny` scale.

The demo (`bash launch/local.sh`) runs this and the `single` row at the same scale.
"""

from configs import multi5_permute


def get_config():
  return multi5_permute.get_config("tiny")
