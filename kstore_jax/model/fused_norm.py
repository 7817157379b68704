"""The residual add and the LayerNorm (or RMSNorm) after it in one pass for GPUs (Pallas,
lowered to Triton).

A pre-norm block adds each sub-layer's output (a projection's product and its bias) to the
residual stream and normalises the sum for the next sub-layer. XLA runs that as three kernels
(the add, the row statistics, the normalisation: the sum written once and read twice) and its
backward as three more; at the paper's shape that traffic was ~9 of the step's 126 GB
(BENCHMARKS.md, "The step's floor"). Here one kernel reads the stream and the product and
writes the sum and the normalised rows (with each row's mean and reciprocal deviation for the
backward), and one backward kernel reads the sum, the normalised rows' cotangent and the sum's
own cotangent and writes the stream's cotangent, with the scale's, the shift's and the
product bias's gradients as per-program column sums (added up by XLA: deterministic, no
atomics).

A program takes `Launch.rows` rows whole; a row of D columns is loaded in C chunks of P columns
(P the largest power of two dividing D, at most 1024: Triton's tensors have power-of-two
sizes, D = 768 is 3 x 256), each pass reloading its chunks (the block stays in L2): registers
hold a chunk, not a row. Statistics in f32 (var = E[s^2] - E[s]^2, as flax's LayerNorm);
the sum is rounded to the stream's dtype before it is normalised, as the unfused model does.

Shapes: Z rows (a batch's tokens, flattened), D columns (d_model).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


class Launch(NamedTuple):
  """`rows` a program (a power of two) and Triton's `warps` a program."""
  rows: int = 32
  warps: int = 16


# the model's: read from ptxas at the paper's D = 768 (BENCHMARKS.md, session 39), 60
# registers forward and 115 backward in the paper step, no spills; 8 warps took 98 and 247
# (one 256-thread program an SM in the backward); 16 rows at 8 warps fewer, but twice the
# column sums
LAUNCH = Launch()


def _chunk(D: int) -> int:
  """P: the largest power of two dividing D, at most 1024."""
  return min(D & -D, 1024)


def _sum_chunk(x_ref, h_ref, hb_ref, cols, dtype):
  """The stream plus the product plus its bias at `cols`, rounded to the stream's dtype, in
  f32: [rows, P]."""
  s = x_ref[:, cols].astype(jnp.float32)
  if h_ref is not None:
    s += h_ref[:, cols].astype(jnp.float32)
  if hb_ref is not None:
    s += hb_ref[cols].astype(jnp.float32)[None, :]
  return s.astype(dtype).astype(jnp.float32)


def _forward_kernel(*refs, has_h, has_hb, rms, eps):
  """Rows [i R, (i + 1) R): s = x + h + hb, y = norm(s) * scale (+ shift), mean, rstd."""
  it = iter(refs)
  x_ref = next(it)
  h_ref = next(it) if has_h else None
  hb_ref = next(it) if has_hb else None
  scale_ref = next(it)
  shift_ref = None if rms else next(it)
  s_ref, y_ref, mean_ref, rstd_ref = it
  D = x_ref.shape[1]
  P = _chunk(D)
  total = jnp.zeros((x_ref.shape[0],), jnp.float32)
  squares = jnp.zeros((x_ref.shape[0],), jnp.float32)
  for c in range(D // P):
    cols = pl.ds(c * P, P)
    s = _sum_chunk(x_ref, h_ref, hb_ref, cols, s_ref.dtype)
    s_ref[:, cols] = s.astype(s_ref.dtype)
    total += s.sum(-1)
    squares += (s * s).sum(-1)
  mean = jnp.zeros_like(total) if rms else total / D
  rstd = jax.lax.rsqrt(jnp.maximum(squares / D - mean * mean, 0.0) + eps)
  for c in range(D // P):
    cols = pl.ds(c * P, P)
    s = _sum_chunk(x_ref, h_ref, hb_ref, cols, s_ref.dtype)
    y = (s - mean[:, None]) * rstd[:, None] * scale_ref[cols].astype(jnp.float32)[None, :]
    if shift_ref is not None:
      y += shift_ref[cols].astype(jnp.float32)[None, :]
    y_ref[:, cols] = y.astype(y_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _backward_kernel(*refs, n_dy, has_ds, has_hb, rms):
  """Rows [i R, (i + 1) R): the sum's whole cotangent ds + norm'(dy), and this program's
  column sums of dy * s_hat (scale), dy (shift) and the sum's cotangent (the product's bias);
  dy the sum of the n_dy cotangents of the normalised rows' copies."""
  it = iter(refs)
  s_ref = next(it)
  dy_refs = [next(it) for _ in range(n_dy)]
  ds_ref = next(it) if has_ds else None
  mean_ref, rstd_ref, scale_ref, dsum_ref, dscale_ref = (next(it) for _ in range(5))
  dshift_ref = None if rms else next(it)
  dhb_ref = next(it) if has_hb else None
  D = s_ref.shape[1]
  P = _chunk(D)
  mean, rstd = mean_ref[...], rstd_ref[...]

  def chunk(c):
    cols = pl.ds(c * P, P)
    s_hat = (s_ref[:, cols].astype(jnp.float32) - mean[:, None]) * rstd[:, None]
    dy = sum(dy_ref[:, cols].astype(jnp.float32) for dy_ref in dy_refs)
    return cols, s_hat, dy, dy * scale_ref[cols].astype(jnp.float32)[None, :]

  g_mean = jnp.zeros_like(mean)       # mean over the row of g = dy * scale
  gs_mean = jnp.zeros_like(mean)      # mean of g * s_hat
  for c in range(D // P):
    _, s_hat, _, g = chunk(c)
    g_mean += g.sum(-1) / D
    gs_mean += (g * s_hat).sum(-1) / D
  if rms:
    g_mean = jnp.zeros_like(g_mean)
  for c in range(D // P):
    cols, s_hat, dy, g = chunk(c)
    ds = (g - g_mean[:, None] - s_hat * gs_mean[:, None]) * rstd[:, None]
    if ds_ref is not None:
      ds += ds_ref[:, cols].astype(jnp.float32)
    dsum_ref[:, cols] = ds.astype(dsum_ref.dtype)
    dscale_ref[cols] = (dy * s_hat).sum(0)
    if dshift_ref is not None:
      dshift_ref[cols] = dy.sum(0)
    if dhb_ref is not None:
      dhb_ref[cols] = ds.sum(0)


def _call(kernel, name, launch, Z, D, inputs, outputs, interpret):
  """pallas_call over Z / rows programs of `inputs`, (array or None, kind) pairs (a None array
  is left out: the kernel is told which are there), and `outputs`, (kind, dtype) pairs; a
  kind is an array's block: 'row' ([rows, D] of a [Z, D] array), 'col' (a whole [D] vector),
  'stat' ([rows] of a [Z] vector), 'part' (program i's [D] row of a [Z / rows, D] array)."""
  inputs = [(a, k) for a, k in inputs if a is not None]
  R = launch.rows
  spec = {"row": pl.BlockSpec((R, D), lambda i: (i, 0)),
          "col": pl.BlockSpec((D,), lambda i: (0,)),
          "stat": pl.BlockSpec((R,), lambda i: (i,)),
          "part": pl.BlockSpec((None, D), lambda i: (i, 0))}
  shape = {"row": (Z, D), "stat": (Z,), "part": (Z // R, D)}
  return pl.pallas_call(
      kernel, grid=(Z // R,), in_specs=[spec[k] for _, k in inputs],
      out_specs=[spec[k] for k, _ in outputs],
      out_shape=[jax.ShapeDtypeStruct(shape[k], dt) for k, dt in outputs],
      compiler_params=plgpu.CompilerParams(num_warps=launch.warps, num_stages=1),
      interpret=interpret, name=name)(*(a for a, _ in inputs))


def _forward(x_ZD, h_ZD, hb_D, scale_D, shift_D, eps, rms, interpret, launch):
  Z, D = x_ZD.shape
  kernel = functools.partial(_forward_kernel, has_h=h_ZD is not None,
                             has_hb=hb_D is not None, rms=rms, eps=eps)
  return _call(kernel, "add_norm_forward", launch, Z, D,
               [(x_ZD, "row"), (h_ZD, "row"), (hb_D, "col"), (scale_D, "col"),
                (shift_D, "col")],
               [("row", x_ZD.dtype), ("row", x_ZD.dtype), ("stat", jnp.float32),
                ("stat", jnp.float32)], interpret)


def _backward(s_ZD, dys_ZD, ds_ZD, mean_Z, rstd_Z, scale_D, has_hb, rms, interpret, launch):
  Z, D = s_ZD.shape
  parts = 1 + (not rms) + has_hb
  kernel = functools.partial(_backward_kernel, n_dy=len(dys_ZD), has_ds=ds_ZD is not None,
                             has_hb=has_hb, rms=rms)
  out = _call(kernel, "add_norm_backward", launch, Z, D,
              [(s_ZD, "row"), *((dy, "row") for dy in dys_ZD), (ds_ZD, "row"),
               (mean_Z, "stat"), (rstd_Z, "stat"), (scale_D, "col")],
              [("row", s_ZD.dtype)] + [("part", jnp.float32)] * parts, interpret)
  return out[0], [p.sum(0) for p in out[1:]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _add_norm(x_ZD, h_ZD, hb_D, scale_D, shift_D, eps, rms, interpret, launch, copies):
  s_ZD, y_ZD, _, _ = _forward(x_ZD, h_ZD, hb_D, scale_D, shift_D, eps, rms, interpret, launch)
  return s_ZD, (y_ZD,) * copies


def _add_norm_fwd(x_ZD, h_ZD, hb_D, scale_D, shift_D, eps, rms, interpret, launch, copies):
  # (symbolic_zeros: each differentiable argument comes as a CustomVJPPrimal)
  x_ZD, h_ZD, hb_D, scale_D, shift_D = (None if a is None else a.value
                                        for a in (x_ZD, h_ZD, hb_D, scale_D, shift_D))
  s_ZD, y_ZD, mean_Z, rstd_Z = _forward(x_ZD, h_ZD, hb_D, scale_D, shift_D, eps, rms,
                                        interpret, launch)
  return (s_ZD, (y_ZD,) * copies), (s_ZD, mean_Z, rstd_Z, scale_D, h_ZD is not None, hb_D,
                                    shift_D)


def _add_norm_bwd(eps, rms, interpret, launch, copies, res, cotangents):
  """The sum's cotangent may be a symbolic zero (the last norm's sum feeds nothing else): the
  kernel then reads none; the copies' cotangents are summed in the kernel, not by XLA."""
  del eps, copies
  s_ZD, mean_Z, rstd_Z, scale_D, has_h, hb_D, shift_D = res
  nonzero = lambda c: not isinstance(c, jax.custom_derivatives.SymbolicZero)
  ds_ZD, dys_ZD = cotangents
  ds_ZD = ds_ZD.astype(s_ZD.dtype) if nonzero(ds_ZD) else None
  dys_ZD = [dy.astype(s_ZD.dtype) for dy in dys_ZD if nonzero(dy)] or [jnp.zeros_like(s_ZD)]
  dsum_ZD, parts = _backward(s_ZD, dys_ZD, ds_ZD, mean_Z, rstd_Z, scale_D, hb_D is not None,
                             rms, interpret, launch)
  parts = iter(parts)
  dscale = next(parts).astype(scale_D.dtype)
  dshift = None if rms else next(parts).astype(shift_D.dtype)
  dhb = None if hb_D is None else next(parts).astype(hb_D.dtype)
  return dsum_ZD, dsum_ZD if has_h else None, dhb, dscale, dshift


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd, symbolic_zeros=True)


def add_norm(x_ZD, h_ZD, hb_D, scale_D, shift_D, eps: float, interpret: bool = False,
             launch: Launch = LAUNCH, copies: int = 1):
  """(s, y): s = x + h + hb in x's dtype (h, hb: None for none), y = LayerNorm(s) * scale +
  shift in x's dtype (shift None: RMSNorm, s * rsqrt(mean(s^2) + eps) * scale); [Z, D] rows
  (a Z that `launch.rows` does not divide is padded with zero rows); `interpret` runs the
  kernels as plain jax ops (CPU tests). `copies` > 1: y is a tuple of that many copies of
  the rows (one buffer), each for one consumer (attention's query, key and value
  projections), whose cotangents the backward kernel sums as it reads them: XLA's sum of
  the consumers' input gradients would read them all and write one more [Z, D] array."""
  Z = x_ZD.shape[0]
  pad = -Z % launch.rows
  if pad:
    rows = lambda a: None if a is None else jnp.pad(a, ((0, pad), (0, 0)))
    s_ZD, ys_ZD = add_norm(rows(x_ZD), rows(h_ZD), hb_D, scale_D, shift_D, eps, interpret,
                           launch, copies)
    ys_ZD = tuple(y[:Z] for y in ys_ZD) if copies > 1 else ys_ZD[:Z]
    return s_ZD[:Z], ys_ZD
  s_ZD, ys_ZD = _add_norm(x_ZD, h_ZD, hb_D, scale_D, shift_D, eps, shift_D is None, interpret,
                          launch, copies)
  return s_ZD, ys_ZD if copies > 1 else ys_ZD[0]
