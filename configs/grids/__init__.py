"""Grid configs (`python -m kstore_jax.grid --config=configs/grids/<grid>.py[:scale]`).

A grid file's `get_config(arg)` returns `make(runs)`: a ConfigDict with a `grid` section
(`max_runs`: the most runs one jitted step trains; `mode`: vmap | processes | sequential |
auto; `run_axis`: where a vmap cohort's run axis goes on the mesh: `replicated` | `data`
(split over the data axis where it divides the cohort); `eval_runs`: whether a vmap grid's
runs decode their eval together (`together`: one pass vmapped over their params; `alone`:
one run after another; `auto`: together on a GPU/TPU, alone on a CPU, where together measured
0.67-0.86x on 2 cores: BENCHMARKS.md "Grid"); `precompile`: whether a vmap grid compiles the
steps of each run's next trained stage in a background thread while the current stage trains
(`on`; `off`; `auto`: on a GPU/TPU, whose host waits on the device meanwhile, off on a CPU,
whose cores the step uses)),
`runs`, the run configs by run name, and `order`, the run names in the order the grid
runs them and the report lists them (a ConfigDict keeps its keys sorted). Each run
config is an ordinary experiment config (a row config at a scale and variants), so each run's
directory is what `python -m kstore_jax.main` would write with it.
"""

import importlib

import ml_collections

MODES = ("auto", "vmap", "processes", "sequential")
RUN_AXES = ("replicated", "data")   # kstore_jax/train/sharding.py run_axis_for
EVAL_RUNS = ("auto", "together", "alone")
PRECOMPILE = ("auto", "on", "off")
# run-name suffix -> base.get_config variants of that training method (PAPER.md Figure 3)
METHODS = {"finetune": "", "mixed": "mixed"}

# The paper's Figure 3 rows, in its order (PAPER.md "Headline numbers", then the fullname
# rows it plots without a number here).
FIG3_ROWS = (
    "single", "single_fullname", "single_permute1", "single_permute2", "single_permute5",
    "multi2", "multi2_permute", "multi5", "multi5_fullname", "multi5_permute",
    "multi5_permute_fullname", "single_permute1_fullname", "single_permute2_fullname",
    "single_permute5_fullname", "multi2_fullname", "multi2_permute_fullname")


def make(runs: dict[str, ml_collections.ConfigDict], max_runs: int = 8, mode: str = "auto",
         run_axis: str = "replicated", eval_runs: str = "auto",
         precompile: str = "auto") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.grid = ml_collections.ConfigDict(dict(max_runs=max_runs, mode=mode, run_axis=run_axis,
                                          eval_runs=eval_runs, precompile=precompile))
  c.runs = ml_collections.ConfigDict(runs)
  c.order = tuple(runs)
  return c


def row_config(row: str, arg: str) -> ml_collections.ConfigDict:
  """configs/<row>.py's config at `arg` ("tiny", "tiny,mixed,probe")."""
  return importlib.import_module(f"configs.{row}").get_config(arg)


def rows_by_method(rows, scale: str, methods=tuple(METHODS),
                   extra: str = "") -> dict[str, ml_collections.ConfigDict]:
  """`<row>_<method>` -> the row at `scale` trained by `method` (METHODS), plus variants
  `extra` (e.g. "probe")."""
  return {f"{row}_{m}": row_config(row, ",".join(filter(None, (scale, METHODS[m], extra))))
          for row in rows for m in methods}
