"""The step's floor from its optimised HLO (train/roofline.py) against numbers counted by hand
in this file, and `bench roofline` (compiling for an H200 here, train/aot.py): without jax's
CUDA plugin one line naming it; with it (launch/aot_plugin.sh installs it into .aot/, not in
CI: the slow test) the small step's floor."""

import json
import os
import subprocess

import pytest

import runs
from kstore_jax.train import roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A GPU-style optimised module: a GEMM fusion (a [64, 32] x [32, 16] dot), an element-wise
# fusion, a while loop run 3 times whose body holds a reduce fusion, a Pallas custom call and
# the views (bitcast, get-tuple-element) that launch nothing.
HLO = """HloModule jit_step, is_scheduled=true

%gemm_computation (p0: bf16[64,32], p1: bf16[32,16]) -> bf16[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (q0: bf16[64,16]) -> f32[64,16] {
  %q0 = bf16[64,16]{1,0} parameter(0)
  %c = f32[64,16]{1,0} convert(%q0)
  ROOT %a = f32[64,16]{1,0} add(%c, %c)
}

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused_reduce (r0: f32[64,16]) -> f32[64] {
  %r0 = f32[64,16]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %r = f32[64]{0} reduce(%r0, %zero), dimensions={1}, to_apply=%sum
}

%body (t: (s32[], f32[64,16])) -> (s32[], f32[64,16]) {
  %t = (s32[], f32[64,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[64,16]{1,0} get-tuple-element(%t), index=1
  %red = f32[64]{0} fusion(%v), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(step)/jvp(head_loss)/reduce_sum"}
  ROOT %o = (s32[], f32[64,16]{1,0}) tuple(%i, %v)
}

%cond (ct: (s32[], f32[64,16])) -> pred[] {
  %ct = (s32[], f32[64,16]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (a: bf16[64,32], b: bf16[32,16], n: s32[]) -> f32[64,16] {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %n = s32[] parameter(2)
  %gemm = bf16[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(step)/jvp(Transformer)/block0/mlp/up/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %view = bf16[64,16]{1,0} bitcast(%gemm)
  %add = f32[64,16]{1,0} fusion(%view), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(Transformer)/block0/mlp/add"}
  %attn = bf16[64,16]{1,0} custom-call(%view, %view), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(Transformer)/block0/attn/flash_docs_forward/pallas_call"}
  %init = (s32[], f32[64,16]{1,0}) tuple(%n, %add)
  %loop = (s32[], f32[64,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[64,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_kernels_bytes_flops_and_trips_as_counted_by_hand():
  ks = {k.name: k for k in roofline.kernels(HLO)}
  assert set(ks) == {"gemm", "add", "attn", "red"}   # views, tuples, the loop itself: none
  # the GEMM reads a (64*32*2) and b (32*16*2), writes 64*16*2; 2*64*16*32 FLOPs
  assert (ks["gemm"].bytes, ks["gemm"].flops, ks["gemm"].kind) == (4096 + 1024 + 2048,
                                                                   65536, "matmul")
  assert (ks["add"].bytes, ks["add"].flops, ks["add"].kind) == (2048 + 4096, 0, "elementwise")
  assert ks["attn"].bytes == 3 * 2048 and ks["attn"].kind.startswith("kernel")
  assert (ks["red"].bytes, ks["red"].runs, ks["red"].kind) == (4096 + 256, 3, "reduction")
  assert roofline.scope(ks["gemm"]) == "block*/mlp/up"
  assert roofline.scope(ks["red"]) == "step/head_loss"
  # floors: the GEMM bound by its FLOPs at 1e9 FLOP/s and 1e9 B/s, the loop body 3 times
  assert ks["gemm"].floor_s(1e9, 1e9) == pytest.approx(65536e-9)
  assert ks["red"].floor_s(1e12, 1e9) == pytest.approx(3 * 4352e-9)
  by_kind = roofline.summary(list(ks.values()), 1e12, 1e9, lambda k: k.kind)
  assert by_kind["reduction"][:3] == (3, 3 * 4352, 0)
  assert by_kind["matmul"][3] == pytest.approx(7168e-9)   # memory-bound at these rates
  # launch-bound: under a megabyte at its edges, whatever its kind
  assert all(k.tiny for k in ks.values())
  assert not roofline.Kernel("big", "elementwise", 1_000_000, 0, "").tiny


def test_element_sizes_from_the_type_name():
  """Any XLA element type counts by its bits (an fp8 or int4 buffer too, not only the
  model's own dtypes)."""
  assert [roofline.dtype_bytes(t) for t in ("pred", "bf16", "f8e4m3fn", "s4", "c64")] == [
      1, 2, 1, 0.5, 8]
  assert roofline.array_bytes("(bf16[2,3]{1,0}, f8e4m3fn[4], s4[8], pred[3], token[])") == 23


def test_a_dot_outside_a_fusion_counts_and_no_entry_is_an_error():
  text = HLO.replace("%gemm = bf16[64,16]{1,0} fusion(%a, %b), kind=kCustom, "
                     "calls=%gemm_computation,",
                     "%gemm = bf16[64,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, "
                     "rhs_contracting_dims={0},")
  gemm = next(k for k in roofline.kernels(text) if k.name == "gemm")
  assert (gemm.flops, gemm.kind) == (65536, "matmul")
  with pytest.raises(ValueError, match="ENTRY"):
    roofline.kernels(HLO.replace("ENTRY ", ""))


def test_a_cublas_gemm_counts_its_flops_and_not_its_workspace():
  """A GEMM XLA hands to cuBLAS (a custom call: what autotuning picks on a device, or every
  GEMM with Triton's off) counts the FLOPs of its config's dimensions, not zero, and its
  operands and result without the workspace it also returns."""
  text = HLO.replace(
      "%gemm = bf16[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_computation,",
      "%gemm = (bf16[64,16]{1,0}, s8[4194304]{0}) custom-call(%a, %b), "
      'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":'
      '{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
      '"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],'
      '"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}},').replace(
      "%view = bf16[64,16]{1,0} bitcast(%gemm)",
      "%view = bf16[64,16]{1,0} get-tuple-element(%gemm), index=0")
  gemm = next(k for k in roofline.kernels(text) if k.name == "gemm")
  assert (gemm.flops, gemm.bytes, gemm.kind) == (65536, 4096 + 1024 + 2048, "matmul")


# A TPU-style module: matmuls written as convolutions (one plain, one over a size-1 dim
# padded 7 both sides with a window of 8: one real tap in 8), and a custom call whose config
# holds a line that starts with "}" (the computation goes on after it)
TPU_HLO = """HloModule jit_step

ENTRY %main (x: bf16[64,32], w: bf16[32,16], a: bf16[4,16,32,1], b: bf16[8,2,32,1]) -> bf16[64,16] {
  %x = bf16[64,32]{1,0:T(8,128)(2,1)} parameter(0)
  %w = bf16[32,16]{1,0:T(8,128)(2,1)} parameter(1)
  %a = bf16[4,16,32,1]{3,2,1,0} parameter(2)
  %b = bf16[8,2,32,1]{3,2,1,0} parameter(3)
  %k = bf16[64,16]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"xprof":"{
}}, metadata={op_name="jit(step)/attn/pallas_call"}
  %mm = bf16[64,16]{1,0:T(8,128)(2,1)} convolution(%x, %w), dim_labels=bf_io->bf
  %pad = bf16[4,16,8,2]{3,2,1,0} convolution(%a, %b), window={size=1x8 pad=0_0x7_7 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f
  ROOT %out = bf16[64,16]{1,0} add(%mm, %k)
}
"""


def test_tpu_convolutions_count_their_real_taps():
  ks = {k.name: k for k in roofline.kernels(TPU_HLO)}
  assert set(ks) == {"k", "mm", "pad", "out"}   # the custom call's } line ends nothing
  assert ks["mm"].flops == 2 * 64 * 16 * 32     # [64, 32] x [32, 16]
  # out [4, 16, 8, 2]: batch 16 x features 2 x dim0 4 positions (window 1, 1 tap each) x dim1
  # 8 positions over an input of size 1 padded 7 both sides (window 8: 1 real tap each)
  # = 4 x 16 x 8 x 2 outputs, each 32 input features x 1 tap
  assert ks["pad"].flops == 2 * (4 * 16 * 8 * 2) * 32
  assert ks["mm"].bytes == 64 * 32 * 2 + 32 * 16 * 2 + 64 * 16 * 2   # tiled layouts: shapes


def test_targets_name_their_devices():
  from kstore_jax.train import aot
  assert aot.target_of("NVIDIA H200") == "h200" and aot.target_of("cpu") is None
  assert aot.target_of("NVIDIA H100 80GB HBM3") == "h100"   # the device tool's H100 (KINDS.md)
  config = aot.target_config("h200")
  assert "core_count: 132" in config and "major: 9 minor: 0" in config
  assert 'device_description_str: "NVIDIA H200"' in config
  assert set(aot.CEILINGS) >= set(aot.TARGETS)


# ptxas -v's report as ptxas 13.5 prints it (two entry functions, one with C7515)
PTXAS = """ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are \
serialized due to non wgmma instructions defining accumulator registers of a wgmma between start \
and end of the pipeline stage in the function 'flash_docs_backward' in line 1211
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'flash_docs_backward' for 'sm_90a'
ptxas info    : Function properties for flash_docs_backward
    784 bytes stack frame, 1740 bytes spill stores, 1472 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
ptxas info    : Compile time = 159.618 ms
ptxas info    : Compiling entry function 'flash_docs_forward' for 'sm_90a'
ptxas info    : Function properties for flash_docs_forward
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 124 registers, used 1 barriers
"""


def test_ptxas_report_read_per_function():
  from kstore_jax.train import aot
  facts = aot.parse_ptxas(PTXAS)
  assert facts == {
      "flash_docs_backward": dict(wgmma_serialized=True, stack_bytes=784,
                                  spill_store_bytes=1740, spill_load_bytes=1472, registers=255),
      "flash_docs_forward": dict(wgmma_serialized=False, stack_bytes=0, spill_store_bytes=0,
                                 spill_load_bytes=0, registers=124)}


def bench_roofline(*extra, env=None):
  return subprocess.run([runs.python(), "-m", "kstore_jax.bench", "roofline",
                         "--config=configs/tiny.py", *extra], cwd=ROOT,
                        env=env or runs.env(), capture_output=True, text=True, check=False,
                        timeout=600)


@pytest.mark.parametrize("target,names", [("h200", ("jax-cuda13-plugin", "aot_plugin.sh")),
                                          ("v5e:2x2", ("libtpu", "aot_plugin.sh --tpu")),
                                          ("a100", ("--target='a100'", "v5e:2x2"))])
def test_without_the_plugin_or_with_another_target_one_line(target, names):
  proc = bench_roofline(f"--target={target}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  err = [l for l in proc.stderr.splitlines() if all(n in l for n in names)]
  assert len(err) == 1, proc.stderr[-2000:]
  assert not proc.stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".aot")),
                    reason="jax's CUDA plugin not installed (bash launch/aot_plugin.sh)")
def test_tiny_step_compiled_for_an_h200():
  env = runs.env(PYTHONPATH=os.path.join(ROOT, ".aot"))
  proc = bench_roofline("--cohort_runs=2", "--profile_top=3", env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  floor = lines[0]
  assert floor["name"] == "roofline_floor_s" and floor["device"] == "NVIDIA H200"
  assert floor["dtype"] == "bfloat16" and floor["attention"] == "pallas_docs"
  # the compiled dots are the model's matmuls: 2 runs x (fwd + 2 bwd) x ~2 N FLOPs a token,
  # within the attention's and the embedding's share of the model's count
  assert 0.7 < floor["matmul_tflop"] / floor["model_tflop"] <= 1.0, floor
  assert 0 < floor["tiny_kernels"] < floor["kernels"]
  # the gradient's and params' norms one reduction over many leaves (optim.global_norm), not
  # one kernel a leaf (the toy model's ~30 leaves each made one for either norm)
  scopes = {l["scope"]: l for l in lines if l["name"] == "roofline_scope_s"}
  assert scopes["step/metrics"]["kernels"] + scopes["step/optimizer"]["kernels"] < 60, scopes
  kinds = {l["kind"]: l for l in lines if l["name"] == "roofline_kind_s"}
  assert "matmul" in kinds and any(k.startswith("kernel") for k in kinds)
  assert sum(l["share"] for l in kinds.values()) == pytest.approx(1.0, abs=1e-3)
  assert len([l for l in lines if l["name"] == "roofline_op_s"]) == 3
  builds = [l for l in lines if l["name"] == "roofline_build"]
  if builds:   # ptxas installed (launch/aot_plugin.sh --ptxas): every launch's two kernels
    model = {l["kernel"] for l in builds if l["launch"] == "model"}
    # the step's own Pallas kernels: attention's and the fused residual add + norm's
    assert model == {"flash_docs_forward", "flash_docs_backward", "add_norm_forward",
                     "add_norm_backward"}, model
    assert all(0 < l["registers"] <= 255 and l["spill_store_bytes"] >= 0 for l in builds)
    assert len({l["launch"] for l in builds}) > 1
