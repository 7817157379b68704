"""Flash attention for GPUs (Pallas, lowered to Triton) that visits only the tiles its
documents reach.

A packed row holds several short documents (bioS: 20-111 positions in rows of 512) and a query
sees only keys of its own document. jax's Pallas kernel (`attention.pallas_attention`) walks
every key tile up to the diagonal and masks what it must not see; at the paper's shape that
is 36 query x key tile pairs a row and head (64-position tiles), most of them masked whole,
and attention was ~30% of the H200 step (BENCHMARKS.md, session 8). Here query tile n walks
only key tiles [k_lo[n], k_hi[n]) - from the first column of the earliest document any of its
queries is in, to its diagonal (causal) or the last column of the latest such document - and
in the backward pass key tile m is visited only by query tiles [q_lo[m], q_hi[m]). Inside a
tile the mask is the exact one (same segment id; key column <= query column if causal), so the
function is jax's kernel's for any segment layout: the bounds leave out only tiles in which no
query sees a key. Like jax's kernel, padding (segment 0) attends to padding: unused outputs.

The tiles' bounds are computed from the segment ids outside the kernel (`tile_bounds`, O(B L))
and read by each program as two scalars, the loop's limits.

Shapes: B rows, L positions, H heads, K head dim (padded to a power of two inside), U = L / Y
tiles of Y positions (a program's own: the forward's query tile, the backward's key and query
tile), Z positions the tiles its loop steps over (`Launch.inner`, Z <= Y), X = L + 1
segment-id slots, G heads a program (`Launch.heads`).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kstore_jax.model.attention import segment_extent, tiles_unsupported

LOG2E = math.log2(math.e)                    # scores go through exp2 (base-2 log-sum-exp)
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite: masked rows cannot make NaN


class Launch(NamedTuple):
  """How the kernels are cut and launched: `block` (Y) the tile a program owns (the forward's
  query tile, the backward's key tile for dk and dv and query tile for dq), a power of two;
  `inner` (Z) the tiles its loop steps over (the forward's and dq's key tiles, dk and dv's
  query tiles), a power of two >= 16 up to Y, 0: Y (asymmetric tiles as in FlashAttention-2's
  Triton kernels: the own tile stays the matrix instructions' 64 rows while the loop's
  smaller tiles bound a document's range more tightly, bioS' 20-111 positions; every dot
  keeps the own tile as its rows, the backward's dk and dv from the scores transposed);
  Triton's `warps` per program and software-pipelining `stages`; `heads` (G)
  the heads one program computes, one after another (a divisor of the model's: fewer,
  longer programs, each loading its row's tile bounds and segment ids once); `split` the
  backward pass as two kernels, dk and dv, then dq (a program's registers hold one of the
  two loops' accumulators: fewer registers, more programs an SM; each loop recomputes its
  probabilities either way); `unroll` the tiles at the diagonal end of each program's
  range (a query tile's last key tiles, a key tile's first query tiles) computed as
  straight-line code after (before) a loop over the rest of the range: their loads need not
  wait for a loop's turn and need no pipeline stage, at the price of computing, masked,
  those that fall outside a shorter range (a packed row's ranges are 1-3 tiles of 64
  positions for documents up to 111: 2 or 3 leave the loop empty); 0: every tile in the
  loop."""
  block: int = 64
  inner: int = 0
  warps: int = 4
  stages: int = 2
  heads: int = 1
  split: bool = False
  unroll: int = 0


LAUNCH = Launch()   # the model's (H200, session 35: 1.33 ms a layer at the paper shape)
WARPS = (1, 2, 4, 8, 16)   # Triton's num_warps: a power of two


def parse_launch(text: str) -> Launch:
  """The launch `model.flash_launch` names: comma-separated `field=value` pairs of Launch
  (block, inner, warps, stages, heads, unroll: integers; split: 0|1|true|false), each
  replacing the model's (LAUNCH); "" is LAUNCH. ValueError saying what is wrong (a field, a
  value)."""
  fields: dict = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, sep, value = part.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or key not in Launch._fields:
      raise ValueError(f"{part!r} is not field=value with a field of {'|'.join(Launch._fields)}")
    if key in fields:
      raise ValueError(f"{key} is given twice")
    if key == "split":
      if value.lower() not in ("0", "1", "true", "false"):
        raise ValueError(f"split={value!r} must be 0|1|true|false")
      fields[key] = value.lower() in ("1", "true")
      continue
    try:
      fields[key] = int(value)
    except ValueError:
      raise ValueError(f"{key}={value!r} must be an integer") from None
  launch = LAUNCH._replace(**fields)
  if launch.block < 16 or launch.block & (launch.block - 1):
    raise ValueError(f"block={launch.block} must be a power of two >= 16 (Triton's dots)")
  if launch.inner and (launch.inner < 16 or launch.inner & (launch.inner - 1)
                       or launch.inner > launch.block):
    raise ValueError(f"inner={launch.inner} must be 0 or a power of two >= 16 (Triton's dots) "
                     f"up to block={launch.block}")
  if launch.warps not in WARPS:
    raise ValueError(f"warps={launch.warps} must be one of {'|'.join(map(str, WARPS))}")
  for key in ("stages", "heads"):
    if getattr(launch, key) < 1:
      raise ValueError(f"{key}={getattr(launch, key)} must be >= 1")
  if launch.unroll < 0:
    raise ValueError(f"unroll={launch.unroll} must be >= 0")
  return launch


def launch_text(launch: Launch) -> str:
  """`launch` as model.flash_launch writes it, every field (parse_launch's inverse)."""
  return ",".join(f"{k}={int(v)}" for k, v in zip(Launch._fields, launch))


def launch_unsupported(launch: Launch, num_heads: int, seq_len: int) -> str | None:
  """Why `launch` cannot run a model of num_heads heads over rows of seq_len positions;
  None when it can."""
  if num_heads % launch.heads:
    return f"heads={launch.heads} (a program's) does not divide the model's {num_heads} heads"
  if problem := tiles_unsupported(seq_len, launch.block):
    return f"block={launch.block} needs {problem}"
  return None


def inner_tile(launch: Launch) -> int:
  """Z: the tiles a program's loop steps over (Launch.inner; 0: the program's own, Y)."""
  return launch.inner or launch.block


def tile_bounds(seg_BL, block: int, causal: bool, inner: int = 0):
  """(k_lo_BU, k_hi_BU, q_lo_BU, q_hi_BU) int32, in tiles of `inner` (Z; 0: `block`) positions:
  query tile n of `block` (Y) positions visits key tiles [k_lo, k_hi), key tile m of Y is
  visited by query tiles [q_lo, q_hi).

  A segment's columns lie between its first and last occurrence in the row, so the keys a
  tile's queries can see lie between the smallest first and the largest last occurrence of
  their segments (and, causal, not after the tile); symmetrically for the queries that see a
  key tile (`segment_extent`)."""
  B, L = seg_BL.shape
  U, Z = L // block, inner or block
  first_BL, last_BL = segment_extent(seg_BL)
  lo_BU = first_BL.reshape(B, U, block).min(-1) // Z
  hi_BU = last_BL.reshape(B, U, block).max(-1) // Z + 1
  if not causal:
    return lo_BU, hi_BU, lo_BU, hi_BU
  starts_BU = jnp.broadcast_to(jnp.arange(U, dtype=jnp.int32) * (block // Z), (B, U))
  return lo_BU, starts_BU + block // Z, starts_BU, hi_BU


def visited_tiles(seg_BL, block: int, causal: bool, unroll: int = 0,
                  inner: int = 0) -> tuple[int, int]:
  """(query x key positions in the tiles this kernel computes, those of a causal-only walk's
  tiles of `block`; all L^2 if not causal), summed over the rows: the share of attention's
  tile work left. A query tile's range shorter than `unroll` (Launch.unroll) is computed as
  `unroll` tiles of `inner` (0: `block`), the rest masked."""
  B, L = seg_BL.shape
  U, Z = L // block, inner or block
  k_lo, k_hi, _, _ = tile_bounds(jnp.asarray(seg_BL), block, causal, Z)
  return (int(jnp.maximum(k_hi - k_lo, unroll).sum()) * block * Z,
          B * (U * (U + 1) // 2 if causal else U * U) * block * block)


def _scores(a_MK, b_NK, seg_a_M, seg_b_N, a0, b0, scale, causal, valid=True, keys_first=False):
  """Base-2 scaled scores of the M positions from a0 (a_MK) against the N from b0 (b_NK),
  masked (all of them where `valid` is false: an unrolled tile outside the range): [M, N]
  float32; a holds the queries and b the keys, or (`keys_first`) the other way round: the
  scores transposed."""
  s_MN = plgpu.dot(a_MK, b_NK.T) * (scale * LOG2E)
  visible = seg_a_M[:, None] == seg_b_N[None, :]
  if causal:
    a_M1 = (a0 + jnp.arange(a_MK.shape[0]))[:, None]
    b_1N = (b0 + jnp.arange(b_NK.shape[0]))[None, :]
    visible &= (a_M1 <= b_1N) if keys_first else (a_M1 >= b_1N)
  if valid is not True:
    visible &= valid
  return jnp.where(visible, s_MN, MASKED)


def _walk(lo, hi, unroll: int, at_end: bool, body, carry):
  """carry through body(m, carry, valid) for every tile m of [lo, hi): the `unroll` tiles at
  the range's end (`at_end`: after a loop over the rest) or start (before it) as
  straight-line code, each at a tile index inside [lo, hi), `valid` false where the range is
  shorter than `unroll` (the body masks that tile whole); the rest in a loop."""
  loop = lambda a, b, c: lax.fori_loop(a, b, lambda m, c: body(m, c, True), c)
  if not unroll:
    return loop(lo, hi, carry)
  if at_end:
    carry = loop(lo, hi - unroll, carry)          # empty when the range fits the unrolled tiles
    for j in range(unroll):
      m = hi - unroll + j
      carry = body(jnp.maximum(m, lo), carry, m >= lo)
    return carry
  for j in range(unroll):
    m = lo + j
    carry = body(jnp.minimum(m, hi - 1), carry, m < hi)
  return loop(lo + unroll, hi, carry)


def _tile(ref, rows, g):
  """Head g's [Y, K] rows of a tile or row ref: [L, K] (one head a program, the head dim
  squeezed by its BlockSpec) or [L, G, K]."""
  return ref[rows, :] if len(ref.shape) == 2 else ref[rows, g, :]


def _put(ref, g, value):
  """Store head g's [Y, K] tile into `ref` ([Y, K] or [Y, G, K])."""
  if len(ref.shape) == 2:
    ref[...] = value
  else:
    ref[:, g, :] = value


def _stat(ref, rows, g):
  """Head g's per-query statistics (lse, delta) at `rows`: `ref` [L] or [G, L]."""
  return ref[rows] if len(ref.shape) == 1 else ref[g, rows]


def _put_stat(ref, g, value):
  """Store head g's per-query statistics into `ref` ([Y] or [G, Y])."""
  if len(ref.shape) == 1:
    ref[...] = value
  else:
    ref[g, :] = value


def _heads(tile_ref) -> int:
  """G: the heads a program computes (its [Y, K] or [Y, G, K] tile)."""
  return 1 if len(tile_ref.shape) == 2 else tile_ref.shape[1]


def _forward_kernel(k_lo_ref, k_hi_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    scale, causal, block, inner, unroll):
  """Query tile n of G heads (q_ref, o_ref: [Y, G, K]; k_ref, v_ref: the row's [L, G, K]),
  one head after another over the tile's key range in tiles of Z (`inner`)."""
  n = pl.program_id(0)
  seg_q_Y = seg_ref[pl.ds(n * block, block)]
  K = q_ref.shape[-1]
  # (each head's loop bodies are traced by its fori_loop before the next head's: the closures
  # read this head's g and tiles)
  for g in range(_heads(q_ref)):
    q_YK = _tile(q_ref, slice(None), g)

    def visit(m, carry, valid):
      o_YK, max_Y, sum_Y = carry
      cols = pl.ds(m * inner, inner)
      s_YZ = _scores(q_YK, _tile(k_ref, cols, g), seg_q_Y, seg_ref[cols], n * block,
                     m * inner, scale, causal, valid)
      new_max_Y = jnp.maximum(max_Y, s_YZ.max(-1))
      fade_Y = jnp.exp2(max_Y - new_max_Y)
      p_YZ = jnp.exp2(s_YZ - new_max_Y[:, None])
      v_ZK = _tile(v_ref, cols, g)
      o_YK = o_YK * fade_Y[:, None] + plgpu.dot(p_YZ.astype(v_ZK.dtype), v_ZK)
      return o_YK, new_max_Y, sum_Y * fade_Y + p_YZ.sum(-1)

    init = (jnp.zeros((block, K), jnp.float32), jnp.full((block,), -jnp.inf, jnp.float32),
            jnp.zeros((block,), jnp.float32))
    # every query sees itself, so its own tile is in range and sum_Y > 0; an unrolled tile
    # outside the range, all masked, adds nothing (or, visited first, what the next real
    # tile's fade zeroes: the range's last tile, holding the query tile's diagonal, comes last)
    o_YK, max_Y, sum_Y = _walk(k_lo_ref[()], k_hi_ref[()], unroll, True, visit, init)
    _put(o_ref, g, (o_YK / sum_Y[:, None]).astype(o_ref.dtype))
    _put_stat(lse_ref, g, max_Y + jnp.log2(sum_Y))


def _backward_kernel(k_lo_ref, k_hi_ref, q_lo_ref, q_hi_ref, seg_ref, q_ref, k_ref, v_ref,
                     do_ref, lse_ref, delta_ref, *out_refs, scale, causal, block, inner, parts,
                     unroll):
  """Key tile t (dk, dv) and query tile t (dq) of G heads, one head after another (q_ref,
  k_ref, v_ref, do_ref: the row's [L, G, K]; lse_ref, delta_ref: [G, L]), each over its range
  in tiles of Z (`inner`); `parts` which: "all" (out_refs dq, dk, dv), or a split backward's
  "kv" (dk, dv) or "q" (dq). Every dot has the program's own tile as its rows (dk and dv from
  the scores transposed, [Y, Z])."""
  dq_ref, dk_ref, dv_ref = {"all": out_refs, "kv": (None, *out_refs),
                            "q": (*out_refs, None, None)}[parts]
  t = pl.program_id(2)   # this program's key tile (dk, dv) and query tile (dq)
  K = q_ref.shape[-1]
  zeros = jnp.zeros((block, K), jnp.float32)
  own = pl.ds(t * block, block)
  seg_t_Y = seg_ref[own]
  for g in range(_heads(out_refs[0])):   # (closures as in the forward kernel)
    if dk_ref is not None:
      k_YK, v_YK = _tile(k_ref, own, g), _tile(v_ref, own, g)

      def into_key_tile(n, carry, valid):
        dk_YK, dv_YK = carry
        rows = pl.ds(n * inner, inner)
        q_ZK, do_ZK = _tile(q_ref, rows, g), _tile(do_ref, rows, g)
        st_YZ = _scores(k_YK, q_ZK, seg_t_Y, seg_ref[rows], t * block, n * inner, scale,
                        causal, valid, keys_first=True)
        pt_YZ = jnp.exp2(st_YZ - _stat(lse_ref, rows, g)[None, :])   # masked: 0
        dv_YK += plgpu.dot(pt_YZ.astype(do_ZK.dtype), do_ZK)
        dst_YZ = pt_YZ * (plgpu.dot(v_YK, do_ZK.T) - _stat(delta_ref, rows, g)[None, :]) * scale
        dk_YK += plgpu.dot(dst_YZ.astype(q_ZK.dtype), q_ZK)
        return dk_YK, dv_YK

      dk_YK, dv_YK = _walk(q_lo_ref[()], q_hi_ref[()], unroll, False, into_key_tile,
                           (zeros, zeros))
      _put(dk_ref, g, dk_YK.astype(dk_ref.dtype))
      _put(dv_ref, g, dv_YK.astype(dv_ref.dtype))

    if dq_ref is not None:
      q_YK, do_YK = _tile(q_ref, own, g), _tile(do_ref, own, g)
      lse_Y, delta_Y = _stat(lse_ref, own, g), _stat(delta_ref, own, g)

      def from_key_tile(m, dq_YK, valid):
        cols = pl.ds(m * inner, inner)
        k_ZK, v_ZK = _tile(k_ref, cols, g), _tile(v_ref, cols, g)
        s_YZ = _scores(q_YK, k_ZK, seg_t_Y, seg_ref[cols], t * block, m * inner, scale, causal,
                       valid)
        p_YZ = jnp.exp2(s_YZ - lse_Y[:, None])   # masked: 0
        ds_YZ = p_YZ * (plgpu.dot(do_YK, v_ZK.T) - delta_Y[:, None]) * scale
        return dq_YK + plgpu.dot(ds_YZ.astype(k_ZK.dtype), k_ZK)

      _put(dq_ref, g, _walk(k_lo_ref[()], k_hi_ref[()], unroll, True, from_key_tile,
                            zeros).astype(dq_ref.dtype))


def _specs(L, K, block, G):
  """BlockSpecs over a grid (tile, row, head group) [forward] or (row, head group, tile)
  [backward]; a head group is G consecutive heads (G = 1: the head dim squeezed)."""
  g = None if G == 1 else G
  return dict(
      fwd_tile=pl.BlockSpec((None, block, g, K), lambda n, b, h: (b, n, h, 0)),
      fwd_row=pl.BlockSpec((None, L, g, K), lambda n, b, h: (b, 0, h, 0)),
      fwd_seg=pl.BlockSpec((None, L), lambda n, b, h: (b, 0)),
      fwd_bound=pl.BlockSpec((None, None), lambda n, b, h: (b, n)),
      fwd_lse=pl.BlockSpec((None, g, block), lambda n, b, h: (b, h, n)),
      bwd_tile=pl.BlockSpec((None, block, g, K), lambda b, h, t: (b, t, h, 0)),
      bwd_row=pl.BlockSpec((None, L, g, K), lambda b, h, t: (b, 0, h, 0)),
      bwd_seg=pl.BlockSpec((None, L), lambda b, h, t: (b, 0)),
      bwd_bound=pl.BlockSpec((None, None), lambda b, h, t: (b, t)),
      bwd_lse=pl.BlockSpec((None, g, L), lambda b, h, t: (b, h, 0)),
  )


def _forward(q_BLHK, k_BLHK, v_BLHK, seg_BL, bounds, scale, causal, interpret, launch):
  B, L, H, K = q_BLHK.shape
  block, G = launch.block, launch.heads
  k_lo, k_hi, _, _ = bounds
  sp = _specs(L, K, block, G)
  kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, block=block,
                             inner=inner_tile(launch), unroll=launch.unroll)
  return pl.pallas_call(
      kernel, grid=(L // block, B, H // G),
      in_specs=[sp["fwd_bound"], sp["fwd_bound"], sp["fwd_seg"], sp["fwd_tile"],
                sp["fwd_row"], sp["fwd_row"]],
      out_specs=[sp["fwd_tile"], sp["fwd_lse"]],
      out_shape=[jax.ShapeDtypeStruct(q_BLHK.shape, q_BLHK.dtype),
                 jax.ShapeDtypeStruct((B, H, L), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=launch.warps,
                                           num_stages=launch.stages),
      interpret=interpret, name="flash_docs_forward",
  )(k_lo, k_hi, seg_BL, q_BLHK, k_BLHK, v_BLHK)


def _backward(q_BLHK, k_BLHK, v_BLHK, seg_BL, bounds, o_BLHK, lse_BHL, do_BLHK, scale, causal,
              interpret, launch):
  B, L, H, K = q_BLHK.shape
  block, G = launch.block, launch.heads
  delta_BHL = jnp.einsum("blhk,blhk->bhl", o_BLHK.astype(jnp.float32),
                         do_BLHK.astype(jnp.float32))
  sp = _specs(L, K, block, G)

  def call(parts, outs, name):
    kernel = functools.partial(_backward_kernel, scale=scale, causal=causal, block=block,
                               inner=inner_tile(launch), parts=parts, unroll=launch.unroll)
    return pl.pallas_call(
        kernel, grid=(B, H // G, L // block),
        in_specs=[sp["bwd_bound"]] * 4 + [sp["bwd_seg"]] + [sp["bwd_row"]] * 4
        + [sp["bwd_lse"]] * 2,
        out_specs=[sp["bwd_tile"]] * len(outs),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
        compiler_params=plgpu.CompilerParams(num_warps=launch.warps,
                                             num_stages=launch.stages),
        interpret=interpret, name=name,
    )(*bounds, seg_BL, q_BLHK, k_BLHK, v_BLHK, do_BLHK, lse_BHL, delta_BHL)

  if not launch.split:
    return call("all", (q_BLHK, k_BLHK, v_BLHK), "flash_docs_backward")
  dk, dv = call("kv", (k_BLHK, v_BLHK), "flash_docs_backward_kv")
  return call("q", (q_BLHK,), "flash_docs_backward_q")[0], dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q_BLHK, k_BLHK, v_BLHK, seg_BL, scale, causal, interpret, launch):
  bounds = tile_bounds(seg_BL, launch.block, causal, launch.inner)
  return _forward(q_BLHK, k_BLHK, v_BLHK, seg_BL, bounds, scale, causal, interpret, launch)[0]


def _flash_fwd(q_BLHK, k_BLHK, v_BLHK, seg_BL, scale, causal, interpret, launch):
  bounds = tile_bounds(seg_BL, launch.block, causal, launch.inner)   # once: the backward
  # pass reuses them
  o_BLHK, lse_BHL = _forward(q_BLHK, k_BLHK, v_BLHK, seg_BL, bounds, scale, causal, interpret,
                             launch)
  return o_BLHK, (q_BLHK, k_BLHK, v_BLHK, seg_BL, bounds, o_BLHK, lse_BHL)


def _flash_bwd(scale, causal, interpret, launch, res, do_BLHK):
  q_BLHK, k_BLHK, v_BLHK, seg_BL, bounds, o_BLHK, lse_BHL = res
  dq, dk, dv = _backward(q_BLHK, k_BLHK, v_BLHK, seg_BL, bounds, o_BLHK, lse_BHL, do_BLHK,
                         scale, causal, interpret, launch)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal: bool, interpret: bool = False,
              launch: Launch = LAUNCH) -> jax.Array:
  """softmax(q·kᵀ/√K + mask)·v over packed rows, [B, L, H, K] in and out; `launch` the
  kernels' tiles (Y and Z: powers of two, cut to L, L a multiple of Y), Triton parameters and heads
  a program; `interpret` runs the kernels as plain jax ops (CPU tests). A head dim that is not
  a power of two is zero-padded (the padded columns add nothing to q·k and are dropped from
  the output)."""
  K = q_BLHK.shape[-1]
  padded = 1 << (K - 1).bit_length()
  if padded != K:
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded - K)))
    q_BLHK, k_BLHK, v_BLHK = pad(q_BLHK), pad(k_BLHK), pad(v_BLHK)
  if q_BLHK.shape[2] % launch.heads:
    raise ValueError(f"flash_docs: {launch.heads} heads a program do not divide "
                     f"{q_BLHK.shape[2]} heads")
  block = min(launch.block, q_BLHK.shape[1])
  launch = launch._replace(block=block, inner=min(launch.inner, block))
  out = _flash(q_BLHK, k_BLHK, v_BLHK, seg_BL.astype(jnp.int32), 1.0 / math.sqrt(K), causal,
               interpret, launch)
  return out[..., :K]
