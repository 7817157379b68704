"""The small grid of the accelerator check: five rows spanning the paper's range x {QA
finetune, mixed training}, 10 runs at the `small` scale (launch/device_check.sh).

    python -m kstore_jax.grid --config=configs/grids/small5.py:small --workdir=runs/small5
"""

from configs import grids

ROWS = ("single", "single_permute5", "multi5", "multi5_permute", "multi5_permute_fullname")


def get_config(arg: str = "small"):
  return grids.make(grids.rows_by_method(ROWS, arg), max_runs=10)
