"""A jax.profiler trace of a window of training steps (`train.profile_steps = "START,STOP"`).

    profiler = StepProfiler(stage_dir, cfg.train.profile_steps)   # '' = off: every call a no-op
    with profiler:                      # leaving stops a trace still running (error, SIGTERM)
      for step in range(start, steps):
        profiler.step(step, pending)    # before running `step`; pending: the last step's outputs
        pending = train_step(...)

The trace covers steps START .. STOP - 1 (a resume inside the window traces from the resumed
step on) and lands in `<stage>/profile/plugins/profile/<run>/` (`*.xplane.pb`, `*.trace.json.gz`):
open it with TensorBoard's profile plugin (`tensorboard --logdir <stage>/profile`) or drop the
`.trace.json.gz` on https://ui.perfetto.dev.
"""

import os

import jax

from kstore_jax import rundir


def parse_steps(text: str) -> tuple[int, int] | None:
  """"START,STOP" -> (START, STOP) with 0 <= START < STOP; '' -> None (ValueError otherwise)."""
  if not text.strip():
    return None
  parts = text.split(",")
  try:
    start, stop = (int(p) for p in parts)
  except ValueError:
    raise ValueError("expected 'START,STOP' (two step numbers) or '' (off)") from None
  if not 0 <= start < stop:
    raise ValueError(f"expected 0 <= START < STOP, got {start},{stop}")
  return start, stop


class StepProfiler:
  """Starts `jax.profiler.start_trace(<stage_dir>/profile)` at step START, stops it at STOP."""

  def __init__(self, stage_dir: str, profile_steps: str):
    self.window = parse_steps(profile_steps)
    self.log_dir = os.path.join(stage_dir, rundir.PROFILE)
    self.active = False

  def step(self, step: int, pending=None) -> None:
    """Call before running `step`. Starts the trace when step is in [START, STOP); stops it at
    the first step >= STOP after waiting for `pending` (the traced steps' outputs, so their
    device work is inside the trace)."""
    if self.window is None:
      return
    start, stop = self.window
    if not self.active and start <= step < stop:
      jax.profiler.start_trace(self.log_dir)
      self.active = True
    elif self.active and step >= stop:
      self.stop(pending)

  def stop(self, pending=None) -> None:
    """Stop a running trace (after waiting for `pending`); nothing when none runs."""
    if self.active:
      jax.block_until_ready(pending)
      jax.profiler.stop_trace()
      self.active = False

  def __enter__(self) -> "StepProfiler":
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
