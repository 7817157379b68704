"""The paper's Figure 3: the 16 bioS rows x {QA finetune, mixed training}, 32 runs.

    python -m kstore_jax.grid --config=configs/grids/fig3.py:tiny --workdir=runs/fig3
    python -m kstore_jax.report runs/fig3
"""

from configs import grids


def get_config(arg: str = "tiny"):
  return grids.make(grids.rows_by_method(grids.FIG3_ROWS, arg))
