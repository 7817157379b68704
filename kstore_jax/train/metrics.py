"""metrics.jsonl (one JSON object per logged step; rundir.read_metrics reads it) + TensorBoard
event files (tensorboardX)."""

import json
import math

import tensorboardX

from kstore_jax import rundir


class MetricsWriter:
  """Appends to `<dir>/metrics.jsonl`; on resume, drops lines past the restored step so the
  file equals an uninterrupted run's."""

  def __init__(self, directory: str, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = rundir.metrics_file(directory)
    self.tb = None
    if not enabled:
      return
    kept = [row for row in rundir.read_metrics(self.path)
            if (s := rundir.metrics_step(row)) is not None and s <= resume_step]
    # atomically: truncating in place, a kill mid-write lost the stage's history
    rundir.write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
    # TensorBoard drops the earlier event files' points past the restored step (those of the
    # steps trained again; all of them on a restart from step 0), as metrics.jsonl its lines
    self.tb = tensorboardX.SummaryWriter(directory, flush_secs=30, purge_step=resume_step + 1)

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    row = {"step": step, **{k: (float(v) if not isinstance(v, str) else v)
                            for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, float) and math.isfinite(v):
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()

