"""`python -m kstore_jax.bench lower`: on this CPU machine, lower the train step (alone and
vmapped over two grid runs) and the KV-cache QA decoding for CUDA and TPU with `auto` resolved
for them; they must take the flash kernels (no [B, H, L, T] float32 scores) and no CPU-only
construct."""

import functools
import json
import os
import subprocess

import pytest

import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 256-position rows: splash keeps a [B, H, L, 128] float32 residual, under [B, H, L, L] at L > 128
SMALL = ["--config=configs/tiny.py", "--config.data.seq_len=256",
         "--config.pretrain.batch_size=16"]


@functools.cache   # the same lowering, asked by several tests (one file runs on one worker)
def lower(platform, *extra, n_devices=1):
  """`bench lower`'s one JSON line for `platform` (read only: callers share it)."""
  proc = subprocess.run([runs.python(), "-m", "kstore_jax.bench", "lower", *SMALL,
                         f"--platform={platform}", *extra], cwd=ROOT,
                        env=runs.env(n_devices=n_devices),
                        capture_output=True,
                        text=True, check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert len(lines) == 1 and lines[0]["name"] == "lowered"
  return lines[0]


def no_cpu_only(calls):
  return not [c for c in calls if "cpu" in c.lower() or "callback" in c.lower()]


@pytest.mark.parametrize("platform,kernel,call", [("cuda", "pallas_docs", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "splash", "tpu_custom_call")])
def test_lowers_flash_attention_for(platform, kernel, call):
  r = lower(platform)
  assert r["platform"] == platform and r["attention"] == kernel and r["dtype"] == "bfloat16"
  assert r["norm"] == ("pallas" if platform == "cuda" else "xla")
  assert call in r["train"]["custom_calls"]
  assert call in r["grid"]["custom_calls"]   # the vmapped grid step keeps the flash kernel
  assert r["max_f32_4d_buffer_bytes"] < r["scores_f32_bytes"], r
  assert no_cpu_only(r["custom_calls"]), r["custom_calls"]
  assert r["params"] > 0 and r["flops_per_token"] > 0


@pytest.mark.parametrize("platform,call", [("cuda", "__gpu$xla.gpu.triton"),
                                           ("tpu", "tpu_custom_call")])
def test_lowers_on_a_mesh_of_several_devices(platform, call):
  """Data parallel over 4 devices: the flash kernels run per shard (a Mosaic kernel is not
  partitioned by XLA: lowering it on a mesh of several devices failed before)."""
  r = lower(platform, n_devices=4)
  assert call in r["train"]["custom_calls"] and call in r["grid"]["custom_calls"]
  # each in a shard_map (CUDA lowered before too: every device ran the whole batch's)
  assert r["train"]["manual_computations"] > 0 and r["grid"]["manual_computations"] > 0
  assert lower(platform)["train"]["manual_computations"] == 0   # one device: called directly


def test_fused_norms_are_kernels_of_the_cuda_step():
  """On CUDA each residual add with the norm after it is one Triton kernel forward and one
  backward: 2 per norm (2 a block and the final one) more than with XLA's norms."""
  fused, xla = lower("cuda"), lower("cuda", "--config.model.norm=xla")
  assert xla["norm"] == "xla"
  count = lambda r: r["train"]["call_counts"]["__gpu$xla.gpu.triton"]
  layers = 4   # configs/tiny.py
  assert count(fused) - count(xla) == 2 * (2 * layers + 1)


def test_xla_attention_shows_its_scores():
  """The check above can fail: XLA's attention lowered for CUDA names the f32 scores."""
  r = lower("cuda", "--config.model.attention=xla")
  assert r["attention"] == "xla" and r["max_f32_4d_buffer_bytes"] >= r["scores_f32_bytes"]


@pytest.mark.parametrize("platform,args,key,says", [
    ("cuda", ["--config.model.attention=cudnn", "--config.model.dtype=float32"],
     "model.attention", "float32"),
    ("tpu", ["--config.model.norm=pallas"], "model.norm", "not tpu"),
    ("cuda", ["--config.model.norm=triton"], "model.norm", "auto|xla|pallas"),
    ("cuda", ["--config.model.flash_launch=warps=3"], "model.flash_launch", "1|2|4|8|16"),
    ("cuda", ["--config.model.flash_launch=heads=3"], "model.flash_launch", "does not divide")])
def test_impossible_combination_is_one_line(platform, args, key, says):
  proc = subprocess.run([runs.python(), "-m", "kstore_jax.bench", "lower", *SMALL,
                         f"--platform={platform}", *args], cwd=ROOT, env=runs.env(),
                        capture_output=True,
                        text=True, check=False, timeout=300)
  assert proc.returncode == 2
  err = [l for l in proc.stderr.splitlines() if key in l]
  assert len(err) == 1 and says in err[0], proc.stderr[-2000:]
