"""train.profile_steps: a jax.profiler trace of the chosen steps lands in <stage>/profile/."""

import glob
import os
import re

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


def test_each_process_traces_into_its_own_directory(tmp_path):
  """One process: `<stage>/profile`; several: `profile/process_<i>` each (traces are named by
  host and second, so two processes of a host overwrote each other's)."""
  stage = str(tmp_path)
  assert profiling.trace_dir(stage, 0, 1) == os.path.join(stage, "profile")
  dirs = {profiling.trace_dir(stage, i, 4) for i in range(4)}
  assert dirs == {os.path.join(stage, "profile", f"process_{i}") for i in range(4)}


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


def test_profile_ops_name_the_jax_code_they_came_from(tmp_path):
  """bench profile's attribution: the trace's ops are the traced step's HLO instructions, each
  with the jax name scope it came from; the Python spans around them are left out."""
  from kstore_jax.train import step

  def f(x, w):
    with jax.named_scope(step.OPTIMIZER):   # the matmuls take most of the time
      return jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y @ w), x)

  fn = jax.jit(f)
  x, w = jnp.ones((512, 512)), jnp.full((512, 512), 0.01)
  fn(x, w).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      fn(x, w).block_until_ready()
  text = fn.lower(x, w).compile().as_text()
  sources = profiling.hlo_sources(text)
  totals, where = profiling.trace_op_times(str(tmp_path), sources)
  assert where == "host" and totals and set(totals) <= set(sources), (totals, sources)
  # the loop's own span holds its body's ops: not counted twice
  loops = {n.replace(".", "_") for n in re.findall(r"%([\w.\-]+) = [^\n]*\swhile\(", text)}
  assert loops and not loops & set(sources)
  top = max(totals, key=totals.get)
  assert profiling.scope_of(sources[top]) == "step/optimizer", sources[top]


def test_scope_of_names_the_part_of_the_step():
  scope_of = profiling.scope_of
  assert scope_of("jit(train_step)/transpose(jvp(Transformer))/block11/attn/query/dot_general") \
      == "block*/attn/query"
  assert scope_of("jit(train_step)/jvp(Transformer)/ln_f/LayerNorm_0/mul") == "ln_f/LayerNorm_0"
  assert scope_of("jit(train_step)/jvp(head_loss)/while/body/closed_call/dot_general") \
      == "step/head_loss"
  assert scope_of("jit(train_step)/optimizer/mul") == "step/optimizer"
  assert scope_of("jit(train_step)/reduce_sum") == "step"
