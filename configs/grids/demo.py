"""The README demo as one grid: `single` and `multi5_permute` pretrained, QA-finetuned,
evaluated and probed (launch/local.sh).

    python -m kstore_jax.grid --config=configs/grids/demo.py:tiny --workdir=runs/tiny
"""

from configs import grids


def get_config(arg: str = "tiny"):
  return grids.make({row: grids.row_config(row, f"{arg},probe")
                     for row in ("single", "multi5_permute")})
