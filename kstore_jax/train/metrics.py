"""metrics.jsonl (one JSON object per logged step) + TensorBoard event files (tensorboardX)."""

import json
import math
import os

import tensorboardX


class MetricsWriter:
  """Appends to `<dir>/metrics.jsonl`; on resume, drops lines past the restored step so the
  file equals an uninterrupted run's."""

  def __init__(self, directory: str, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(directory, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l if l.endswith("\n") else l + "\n" for l in f
                if (s := _line_step(l)) is not None and s <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(kept)
    self.tb = tensorboardX.SummaryWriter(directory, flush_secs=30)

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


def _line_step(line: str) -> int | None:
  """The step of a metrics line; None for a blank line or one cut short by a kill."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]
