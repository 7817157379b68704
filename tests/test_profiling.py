"""train.profile_steps: a jax.profiler trace of the chosen steps lands in <stage>/profile/."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from kstore_jax.train import profiling


def test_parse_steps():
  assert profiling.parse_steps("") is None
  assert profiling.parse_steps("3,7") == (3, 7)
  for bad in ("3", "7,3", "a,b", "-1,2", "1,2,3"):
    with pytest.raises(ValueError):
      profiling.parse_steps(bad)


def test_trace_files_appear_for_the_window_only(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  x = jnp.ones((64, 64))
  profiler = profiling.StepProfiler(str(tmp_path), "2,4")
  started = []
  with profiler:
    for step in range(6):
      profiler.step(step, x)
      started.append(profiler.active)
      x = x + f(x)
  assert started == [False, False, True, True, False, False]
  run_dirs = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*"))
  assert len(run_dirs) == 1
  names = os.listdir(run_dirs[0])
  assert any(n.endswith(".xplane.pb") for n in names), names
  assert all(os.path.getsize(os.path.join(run_dirs[0], n)) > 0 for n in names)


def test_off_writes_nothing_and_exit_stops_a_running_trace(tmp_path):
  off = profiling.StepProfiler(str(tmp_path / "off"), "")
  for step in range(3):
    off.step(step)
  assert not (tmp_path / "off").exists()
  on = profiling.StepProfiler(str(tmp_path / "on"), "0,100")
  with pytest.raises(RuntimeError):
    with on:
      on.step(0)
      raise RuntimeError("the stage failed")
  assert not on.active
  assert glob.glob(str(tmp_path / "on" / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
