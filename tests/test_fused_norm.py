"""The residual add and norm in one Pallas kernel (model/fused_norm.py, interpreted on this
CPU) against a NumPy reference written here (forward) and jax's autodiff of a plain formula
written here (gradients); the model with `model.norm=pallas` against the same model with
XLA's norm; on a mesh of 4 devices, per shard, the same gradients."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kstore_jax.model import fused_norm

EPS = 1e-6
# small launches: several programs, and row counts they do not divide (padding)
LAUNCH = fused_norm.Launch(rows=8, warps=4)


def reference(x, h, hb, scale, shift):
  """(s, y) in float64: s = x + h + hb; LayerNorm(s) * scale + shift (shift None: RMSNorm)."""
  f = lambda a: 0.0 if a is None else np.asarray(a, np.float64)
  s = f(x) + f(h) + f(hb)
  mean = 0.0 if shift is None else s.mean(-1, keepdims=True)
  var = ((s - mean) ** 2).mean(-1, keepdims=True)
  return s, (s - mean) / np.sqrt(var + EPS) * f(scale) + f(shift)


def plain(x, h, hb, scale, shift):
  """The same in jnp, for autodiff."""
  s = x + (0.0 if h is None else h) + (0.0 if hb is None else hb)
  mean = 0.0 if shift is None else s.mean(-1, keepdims=True)
  var = ((s - mean) ** 2).mean(-1, keepdims=True)
  return s, (s - mean) * jax.lax.rsqrt(var + EPS) * scale + (0.0 if shift is None else shift)


def inputs(T=44, D=96, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  return (jax.random.normal(k[0], (T, D)) + 0.5, jax.random.normal(k[1], (T, D)),
          jax.random.normal(k[2], (D,)), 1 + 0.2 * jax.random.normal(k[3], (D,)),
          jax.random.normal(k[4], (D,)))


# which of (h, hb, shift) each case has: the full GPT-2 add, a norm alone (the first block's),
# an add without a bias (Llama) with RMSNorm
CASES = {"add_bias_layernorm": (True, True, True), "layernorm_alone": (False, False, True),
         "add_rmsnorm": (True, False, False)}


def pick(case, x, h, hb, scale, shift):
  has_h, has_hb, has_shift = CASES[case]
  return x, h if has_h else None, hb if has_hb else None, scale, shift if has_shift else None


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_numpy(case):
  args = pick(case, *inputs())
  s, y = fused_norm.add_norm(*args, EPS, interpret=True, launch=LAUNCH)
  want_s, want_y = reference(*args)
  np.testing.assert_allclose(s, want_s, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)


def test_a_wrong_variance_or_a_missing_shift_would_fail():
  """The reference tells the two norms apart: RMSNorm is not LayerNorm on rows whose mean is
  not 0 (the inputs' 0.5 offset), so a kernel that dropped the mean would fail above."""
  x, h, hb, scale, shift = inputs()
  _, layer = reference(x, h, hb, scale, shift)
  _, rms = reference(x, h, hb, scale, None)
  assert np.abs(layer - shift - rms).max() > 0.05


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("uses_sum", [True, False])
def test_gradients_equal_autodiff(case, uses_sum):
  """Every input's gradient; the sum's cotangent used (the next residual) or not (the last
  norm's: a symbolic zero the kernel does not read)."""
  args = pick(case, *inputs(seed=1))
  w_s, w_y = jax.random.normal(jax.random.key(9), (2, *args[0].shape))

  def loss(norm):
    def f(*a):
      s, y = norm(*a)
      return (y * w_y).sum() + ((jnp.sin(s) * w_s).sum() if uses_sum else 0.0)
    return f

  fused = lambda *a: fused_norm.add_norm(*a, EPS, interpret=True, launch=LAUNCH)
  present = tuple(i for i, a in enumerate(args) if a is not None)
  got = jax.grad(loss(fused), argnums=present)(*args)
  want = jax.grad(loss(plain), argnums=present)(*args)
  for i, g, w in zip(present, got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=f"argument {i}")


@pytest.mark.parametrize("used", [(True, True, True), (True, False, True)])
def test_copies_sum_their_cotangents(used):
  """copies=3 (attention's query, key and value projections each read its own copy): the
  copies are the rows, and every input's gradient is autodiff's of the rows used three times,
  the cotangents summed in the kernel; an unused copy (a symbolic zero) adds nothing."""
  args = inputs(seed=5)
  w = jax.random.normal(jax.random.key(11), (3, *args[0].shape))

  def loss(ys):
    return sum((y * w[i]).sum() for i, y in enumerate(ys) if used[i])

  fused = lambda *a: loss(fused_norm.add_norm(*a, EPS, interpret=True, launch=LAUNCH,
                                              copies=3)[1])
  want = jax.grad(lambda *a: loss((plain(*a)[1],) * 3), argnums=(0, 1, 2, 3, 4))(*args)
  got = jax.grad(fused, argnums=(0, 1, 2, 3, 4))(*args)
  for i, g, r in zip(range(5), got, want):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5, err_msg=f"argument {i}")
  s, ys = fused_norm.add_norm(*args, EPS, interpret=True, launch=LAUNCH, copies=3)
  assert len(ys) == 3 and all(np.array_equal(y, ys[0]) for y in ys)
  np.testing.assert_allclose(ys[0], reference(*args)[1], rtol=1e-5, atol=1e-5)


def test_chunks_of_a_row_that_is_not_a_power_of_two():
  """D = 768 (the paper's width) is read in 3 chunks of 256: the chunk is the largest power of
  two dividing D, and the statistics span the whole row."""
  assert [fused_norm._chunk(d) for d in (768, 512, 96, 2048)] == [256, 512, 32, 1024]
  args = inputs(T=16, D=768, seed=3)
  s, y = fused_norm.add_norm(*args, EPS, interpret=True, launch=LAUNCH)
  np.testing.assert_allclose(y, reference(*args)[1], rtol=1e-5, atol=1e-5)


def test_bfloat16_rounds_the_sum_before_normalising():
  """In bf16 the sum is the stream's dtype, as the unfused model's add makes it, and y is the
  norm of that rounded sum."""
  x, h, hb, scale, shift = inputs(T=16)
  x, h, hb = (a.astype(jnp.bfloat16) for a in (x, h, hb))
  s, y = fused_norm.add_norm(x, h, hb, scale, shift, EPS, interpret=True, launch=LAUNCH)
  assert s.dtype == y.dtype == jnp.bfloat16
  want_s = (x.astype(jnp.float32) + h.astype(jnp.float32) + hb.astype(jnp.float32)).astype(
      jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(want_s, np.float32))
  want_y = reference(want_s.astype(jnp.float32), None, None, scale, shift)[1]
  np.testing.assert_allclose(np.asarray(y, np.float32), want_y, rtol=2e-2, atol=2e-2)


# a 4-device CPU process: the fused model's loss (relative) and gradients inside `on_mesh` (the
# kernel per shard, rows over `data`) equal one device's
PER_SHARD = """
import sys, json
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from kstore_jax.model import attention
from test_fast_paths import plain_and_other, packed_loss_and_grads, init_params
plain, fused = plain_and_other(norm="pallas")
params = jax.jit(lambda: init_params(plain, jnp.zeros((1, 8), jnp.int32), 3))()
(want, want_g) = packed_loss_and_grads(plain, params)
mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
with attention.on_mesh(mesh):
  (got, got_g) = packed_loss_and_grads(fused, params)
  jaxpr = str(jax.make_jaxpr(lambda: packed_loss_and_grads(fused, params))())
print(json.dumps({"loss": abs(float(got) - float(want)) / abs(float(want)),
                  "grads": max(float(jnp.abs(a - b).max())
                               for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g))),
                  "shard_map": "shard_map" in jaxpr}))
"""


def test_per_shard_on_a_mesh_gives_one_devices_gradients():
  import runs
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", PER_SHARD], cwd=root,
                        env=runs.env(n_devices=4), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["shard_map"] and r["loss"] < 1e-6 and r["grads"] < 1e-6, r
