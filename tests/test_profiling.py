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
  # each traced op's kind, from the ops it runs (not its time: the tanh may outrun the dot)
  kinds = profiling.hlo_kinds(text)
  want = {"dot_general": "matmul", "tanh": "elementwise"}
  got = {n: (sources[n].rsplit("/", 1)[-1], kinds[n]) for n in totals}
  assert {op for op, _ in got.values()} >= set(want), got
  assert all(kind == want[op] for op, kind in got.values() if op in want), got


def test_scope_of_names_the_part_of_the_step():
  scope_of = profiling.scope_of
  assert scope_of("jit(train_step)/transpose(jvp(Transformer))/block11/attn/query/dot_general") \
      == "block*/attn/query"
  assert scope_of("jit(train_step)/jvp(Transformer)/ln_f/LayerNorm_0/mul") == "ln_f/LayerNorm_0"
  assert scope_of("jit(train_step)/jvp(head_loss)/while/body/closed_call/dot_general") \
      == "step/head_loss"
  assert scope_of("jit(train_step)/optimizer/mul") == "step/optimizer"
  assert scope_of("jit(train_step)/reduce_sum") == "step"


# a GPU step's kinds of kernel, in XLA's optimised-HLO text (the shapes of a jax 0.11 dump)
GPU_HLO = """HloModule jit_train_step, is_scheduled=true

%region_sum.1 (a.1: f32[], b.1: f32[]) -> f32[] {
  %a.1 = f32[] parameter(0)
  %b.1 = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a.1, %b.1)
}

%fused_add (param_0: bf16[8,16], param_1: bf16[8,16]) -> bf16[8,16] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  %param_1 = bf16[8,16]{1,0} parameter(1)
  ROOT %add.1 = bf16[8,16]{1,0} add(%param_0, %param_1)
}

%fused_reduce (param_0.1: f32[8,16]) -> f32[8] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0.1, %constant.1), dimensions={1}, to_apply=%region_sum.1
}

%fused_scatter (p.0: f32[4,16], p.1: s32[8,1], p.2: f32[8,16]) -> f32[4,16] {
  %p.0 = f32[4,16]{1,0} parameter(0)
  %p.1 = s32[8,1]{1,0} parameter(1)
  %p.2 = f32[8,16]{1,0} parameter(2)
  ROOT %scatter.1 = f32[4,16]{1,0} scatter(%p.0, %p.1, %p.2), update_window_dims={1}, to_apply=%region_sum.1
}

%fused_transpose (p.3: bf16[8,16]) -> bf16[16,8] {
  %p.3 = bf16[8,16]{1,0} parameter(0)
  ROOT %transpose.1 = bf16[16,8]{1,0} transpose(%p.3), dimensions={1,0}
}

%gemm_fusion_dot.1_computation (parameter_0: bf16[8,16], parameter_1: bf16[16,16]) -> bf16[8,16] {
  %parameter_0 = bf16[8,16]{1,0} parameter(0)
  %parameter_1 = bf16[16,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,16]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.10 (Arg_0.1: bf16[8,16], Arg_1.2: bf16[16,16], Arg_2.3: f32[8,16]) -> (bf16[8,16], f32[8]) {
  %Arg_0.1 = bf16[8,16]{1,0} parameter(0)
  %Arg_1.2 = bf16[16,16]{1,0} parameter(1)
  %Arg_2.3 = f32[8,16]{1,0} parameter(2)
  %custom-call.3 = (bf16[8,16]{1,0}, s8[1024]{0}) custom-call(%Arg_0.1, %Arg_1.2), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/dot_general"}
  %gemm_fusion_dot.1 = bf16[8,16]{1,0} fusion(%Arg_0.1, %Arg_1.2), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"16"}}}
  %custom-call.4 = bf16[8,16]{1,0} custom-call(%Arg_0.1), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI
  %loop_add_fusion = bf16[8,16]{1,0} fusion(%Arg_0.1, %gemm_fusion_dot.1), kind=kLoop, calls=%fused_add
  %input_reduce_fusion = f32[8]{0} fusion(%Arg_2.3), kind=kInput, calls=%fused_reduce
  %scatter_fusion.2 = f32[4,16]{1,0} fusion(%Arg_2.3), kind=kInput, calls=%fused_scatter
  %transpose_fusion = bf16[16,8]{1,0} fusion(%loop_add_fusion), kind=kLoop, calls=%fused_transpose
  %all-reduce.1 = f32[8]{0} all-reduce(%input_reduce_fusion), replica_groups={}, to_apply=%region_sum.1
  ROOT %tuple.5 = (bf16[8,16]{1,0}, f32[8]{0}) tuple(%loop_add_fusion, %all-reduce.1)
}
"""


def test_hlo_kinds_tell_the_kernels_apart():
  """bench profile's `kind`: GEMMs through cuBLAS or XLA's Triton fusions are matmuls, the
  Pallas attention a kernel of its own, and a fusion is what the ops it calls do."""
  kinds = profiling.hlo_kinds(GPU_HLO)
  assert {n: kinds[n] for n in ("custom-call_3", "gemm_fusion_dot_1", "custom-call_4",
                                "loop_add_fusion", "input_reduce_fusion", "scatter_fusion_2",
                                "transpose_fusion", "all-reduce_1")} == {
      "custom-call_3": "matmul", "gemm_fusion_dot_1": "matmul",
      "custom-call_4": "kernel (__gpu$xla.gpu.triton)", "loop_add_fusion": "elementwise",
      "input_reduce_fusion": "reduction", "scatter_fusion_2": "scatter/gather",
      "transpose_fusion": "copy/transpose", "all-reduce_1": "collective"}
