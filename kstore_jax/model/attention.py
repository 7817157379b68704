"""Softmax attention over packed documents, one function per implementation.

Every implementation computes, per head, softmax(q·kᵀ/√K + mask)·v where a query sees a key
when both are in the same document (segment id, 0 = padding, never seen) and, if causal, the
key's position is not after the query's. They differ in how:

| name     | where                 | how                                                        |
|----------|-----------------------|------------------------------------------------------------|
| `einsum` | any                   | two head-major batched matmuls, causal query blocks        |
| `cpu_docs` | CPU (default)       | our C++ kernel (XLA FFI, model/cpu_attention): each row on |
|          |                       | a thread, query blocks against their documents' keys only  |
| `xla`    | any                   | `jax.nn.dot_product_attention(implementation='xla')`: the  |
|          |                       | [B, H, L, T] scores written out                            |
| `pallas` | CUDA (GPU default)    | jax's Pallas/Triton flash kernel with segment ids; CPU runs |
|          |                       | it in interpret mode (tests)                               |
| `pallas_docs` | CUDA             | our Pallas/Triton flash kernel visiting only the tiles  |
|          |                       | a query's documents reach (model/flash_docs); CPU: interpret |
| `tokamax` | CUDA, Hopper         | tokamax's Mosaic GPU flash kernel (optional package), each |
|          |                       | query's document as a key range; CPU: tokamax's XLA path  |
| `cudnn`  | CUDA, Hopper, bf16    | cuDNN flash attention, packed layout (per-document offsets) |
| `splash` | TPU (TPU default)     | Pallas splash attention with segment ids; CPU: interpret   |

The flash kernels (`pallas`, `pallas_docs`, `tokamax`, `cudnn`, `splash`) never write the
scores; they take causal self-attention over packed rows (documents left to right, positions
restarting at 0, so the column order is the position order within a document), as does
`cpu_docs`. Calls with a KV cache (decoding) use `einsum` on CPU and `xla` elsewhere: one
query row against the cache is small.

`resolve(attention, platform)` turns `auto` into a name for a platform (`cpu`, `cuda`, `rocm`,
`tpu`) chosen by the caller at lowering time, so a CPU host can build what a GPU would run;
on a CPU without a C++ compiler `auto` is `einsum`.
"""

import contextlib
import contextvars
import functools
import importlib.util
import math

import jax
import jax.numpy as jnp

from kstore_jax.model import cpu_attention

CAUSAL_BLOCKS = 4   # einsum_attention's query blocks in causal self-attention (training)

IMPLEMENTATIONS = ("einsum", "xla", "cpu_docs", "pallas", "pallas_docs", "tokamax", "cudnn",
                   "splash")
# CUDA: `pallas_docs`, the fastest kernel whose loss agreed on the H200 (session 35: 1.33 ms
# fwd+bwd a layer at the paper shape against 1.67 for `pallas` and 1.80 for `tokamax`; the
# paper train step 0.068 s against 0.072 and 0.071; BENCHMARKS.md)
# CPU: `cpu_docs` (session 44: the tiny train step 0.25-0.30 -> 0.22 s on two threads; the
# einsum path's batched dots and soft-max ran on one thread; BENCHMARKS.md)
DEFAULT = {"cpu": "cpu_docs", "cuda": "pallas_docs", "rocm": "xla", "tpu": "splash"}
# Where each kernel can run (CPU: Pallas interpret mode, for tests; slow).
RUNS_ON = {"einsum": ("cpu", "cuda", "rocm", "tpu"), "xla": ("cpu", "cuda", "rocm", "tpu"),
           "pallas": ("cuda", "cpu"), "pallas_docs": ("cuda", "cpu"), "tokamax": ("cuda", "cpu"),
           "cudnn": ("cuda",), "splash": ("tpu", "cpu"), "cpu_docs": ("cpu",)}
HALF_ONLY = ("cudnn",)   # kernels that need a 16-bit compute dtype
OPTIONAL = {"tokamax": "tokamax"}   # implementation -> the package it needs (not a dependency)
# The device a lowering for a platform targets on a host without one (`lowering_target`):
# (device kind, cores, jax platform); the project's GPU.
LOWERING_TARGETS = {"cuda": ("NVIDIA H200", 132, "gpu")}


def platform_of(devices) -> str:
  """The lowering platform name of a device list (jax calls CUDA devices `gpu`)."""
  p = devices[0].platform
  if p == "gpu":
    return "rocm" if "rocm" in devices[0].client.platform_version.lower() else "cuda"
  return p


def lowering_target(platform: str, mesh=None):
  """A context for tracing what will be lowered for `platform` on a host without its devices:
  the context's abstract mesh (`mesh`'s axes, or none) carries LOWERING_TARGETS[platform] as
  its device. From jax 0.11 on, Pallas's Triton lowering (`pallas`, `pallas_docs`) reads the
  GPU's kind (its compute capability) from there and refuses a host with no GPU. A no-op on
  a host of that platform (its own device counts) and for platforms without a target."""
  target = LOWERING_TARGETS.get(platform)
  if target is None or platform_of(jax.devices()) == platform:
    return contextlib.nullcontext()
  axes = (mesh.axis_sizes, mesh.axis_names, mesh.axis_types) if mesh is not None else ((), ())
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      *axes, abstract_device=jax.sharding.AbstractDevice(*target)))


def resolve(attention: str, platform: str) -> str:
  """`auto` -> the platform's default implementation (a CPU's without a C++ compiler to build
  `cpu_docs`: `einsum`); other names pass through."""
  if attention != "auto":
    return attention
  impl = DEFAULT.get(platform, "xla")
  return "einsum" if impl == "cpu_docs" and cpu_attention.unavailable() else impl


def resolve_dtype(dtype: str, platform: str) -> str:
  """`auto` -> float32 on CPU (no bf16 matrix units), bfloat16 on GPU/TPU."""
  if dtype != "auto":
    return dtype
  return "float32" if platform == "cpu" else "bfloat16"


def unsupported(impl: str, dtype: str, platform: str, seq_len: int) -> str | None:
  """Why `impl` (resolved) cannot run with compute `dtype` on `platform` for rows of seq_len
  positions, in a few words; None when it can."""
  if platform not in RUNS_ON[impl]:
    return f"{impl} runs on {'|'.join(RUNS_ON[impl])}, not {platform}"
  if impl in OPTIONAL and importlib.util.find_spec(OPTIONAL[impl]) is None:
    return f"{impl} needs the {OPTIONAL[impl]} package (pip install {OPTIONAL[impl]})"
  if impl in HALF_ONLY and dtype == "float32":
    return f"{impl} needs model.dtype bfloat16 or float16, not float32"
  if impl == "cpu_docs" and (problem := cpu_attention.unavailable()):
    return problem
  return length_unsupported(impl, seq_len)


PALLAS_TILE = 64   # `pallas`'s query and key tile (pallas_block_sizes)


def tiles_unsupported(seq_len: int, block: int) -> str | None:
  """Why Triton tiles of `block` positions (min(block, seq_len): a power of two >= 16, as
  Triton's arrays and dots need) cannot cut rows of seq_len positions; None when they can."""
  tile = min(block, seq_len)
  if seq_len % tile or tile < 16 or tile & (tile - 1):
    return (f"data.seq_len={seq_len} to be a multiple of {block} (or a power of two >= 16 "
            f"below it)")
  return None


def length_unsupported(impl: str, seq_len: int, block: int = PALLAS_TILE) -> str | None:
  """Why `impl`'s tiles (pallas_docs': `block`, its launch's) cannot cover rows of seq_len
  positions; None when they can."""
  if impl in ("pallas", "pallas_docs") and (problem := tiles_unsupported(seq_len, block)):
    return f"{impl} needs {problem}"
  if impl == "tokamax" and seq_len % 128:   # its Mosaic kernel takes queries 2 x 64 at a time
    return f"tokamax needs data.seq_len={seq_len} to be a multiple of 128"
  if impl == "splash" and (seq_len % 128 or seq_len % min(512, seq_len)):
    return (f"splash needs data.seq_len={seq_len} to be a multiple of 128 (and of 512 above "
            f"512)")
  return None


def mask(q_pos_BL, q_seg_BL, k_pos_BT, k_seg_BT, causal: bool) -> jax.Array:
  """[B, 1, L, T] bool: same (non-padding) segment, and key position <= query position."""
  m = (q_seg_BL[:, :, None] == k_seg_BT[:, None, :]) & (k_seg_BT[:, None, :] > 0)
  if causal:
    m &= k_pos_BT[:, None, :] <= q_pos_BL[:, :, None]
  return m[:, None]


def segment_extent(seg_BL):
  """(first_BL, last_BL) int32: the first and last column of each position's segment id in its
  row (for packed rows: its document's first and last column). Ids outside [0, L] share one
  slot: a wider extent, never a narrower one."""
  B, L = seg_BL.shape
  ids_BL = jnp.clip(seg_BL, 0, L).astype(jnp.int32)
  rows_BL = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, L))
  cols_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None, :], (B, L))
  first_BX = jnp.full((B, L + 1), L, jnp.int32).at[rows_BL, ids_BL].min(cols_BL)
  last_BX = jnp.full((B, L + 1), -1, jnp.int32).at[rows_BL, ids_BL].max(cols_BL)
  return (jnp.take_along_axis(first_BX, ids_BL, 1), jnp.take_along_axis(last_BX, ids_BL, 1))


def einsum_attention(q_BLHK, k_BHTK, v_BHTK, mask_B1LT, causal_blocks: int = 1) -> jax.Array:
  """Softmax attention as two head-major batched matmuls (the CPU default); keys and values
  come head-major (the KV cache stores them so).

  XLA:CPU runs `jax.nn.dot_product_attention`'s [B, L, H, K] einsums and its masked softmax
  through transposed copies of the [B, H, L, T] scores in the backward pass; transposing q, k, v
  (small) to [B, H, ., K] instead, adding the mask as a bias and normalising after the value
  matmul halves attention's forward+backward time at the `small` size (BENCHMARKS.md).
  Rows with no visible key (padding) get a finite, unused output.

  causal_blocks = n > 1 (causal self-attention, query i = key i): the queries go in n blocks,
  block j against keys [0, (j + 1) L / n) only, skipping the key blocks causality masks anyway
  (n = 4: 10/16 of the score work).
  """
  L = q_BLHK.shape[1]
  q_BHLK = q_BLHK.transpose(0, 2, 1, 3)
  q_BHLK = q_BHLK * jnp.asarray(1.0 / math.sqrt(q_BLHK.shape[-1]), q_BLHK.dtype)
  bias_B1LT = jnp.where(mask_B1LT, 0.0, -1e30)

  def attend(q, k, v, bias):
    s_BHLT = jnp.einsum("bhlk,bhtk->bhlt", q, k, preferred_element_type=jnp.float32) + bias
    e_BHLT = jnp.exp(s_BHLT - jax.lax.stop_gradient(s_BHLT.max(-1, keepdims=True)))
    o_BHLK = jnp.einsum("bhlt,bhtk->bhlk", e_BHLT.astype(v.dtype), v,
                        preferred_element_type=jnp.float32)
    return o_BHLK / e_BHLT.sum(-1)[..., None]

  n = causal_blocks if causal_blocks > 1 and L % causal_blocks == 0 else 1
  if n == 1:   # and whenever keys are not the queries' own positions (a KV cache)
    o_BHLK = attend(q_BHLK, k_BHTK, v_BHTK, bias_B1LT)
  else:
    assert k_BHTK.shape[2] == L, "causal blocks need self-attention (T == L)"
    size = L // n
    o_BHLK = jnp.concatenate([
        attend(q_BHLK[:, :, j * size:(j + 1) * size], k_BHTK[:, :, :(j + 1) * size],
               v_BHTK[:, :, :(j + 1) * size],
               bias_B1LT[:, :, j * size:(j + 1) * size, :(j + 1) * size]) for j in range(n)], 2)
  return o_BHLK.astype(q_BLHK.dtype).transpose(0, 2, 1, 3)


def xla_attention(q_BLHK, k_BHTK, v_BHTK, mask_B1LT) -> jax.Array:
  """jax's XLA attention (scores written out), for any mask: decoding against a KV cache on
  accelerators, and a reference point for the flash kernels."""
  return jax.nn.dot_product_attention(q_BLHK, k_BHTK.transpose(0, 2, 1, 3),
                                      v_BHTK.transpose(0, 2, 1, 3), mask=mask_B1LT,
                                      implementation="xla")


# -- flash kernels: causal (or bidirectional) self-attention over packed rows --------------------
def pallas_block_sizes(L: int):
  """Tiles of the Pallas/Triton kernel for rows of L positions (head dims up to 128):
  PALLAS_TILE-row query and key tiles in every pass (the library's 32-row backward tiles leave
  an H100/H200 underfed at head dim 64); at most L."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
  b = min(PALLAS_TILE, L)
  return pallas_gpu.BlockSizes(block_q=b, block_k=b, block_q_dkv=b, block_kv_dkv=b,
                               block_q_dq=b, block_kv_dq=b)


def pallas_attention(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal: bool, interpret: bool,
                     block_sizes=None) -> jax.Array:
  """jax's Pallas flash attention for GPUs (Triton) with segment ids; `interpret` runs it as
  plain jax ops (CPU tests). Padding (segment 0) attends to padding: its outputs are unused."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
  L = q_BLHK.shape[1]
  return pallas_gpu.mha(q_BLHK, k_BLHK, v_BLHK, seg_BL.astype(jnp.int32),
                        sm_scale=1.0 / math.sqrt(q_BLHK.shape[-1]), causal=causal,
                        block_sizes=block_sizes or pallas_block_sizes(L), interpret=interpret)


def packed_offsets(seg_BL, max_docs: int):
  """(lengths, offsets) of the documents of each row in cuDNN's packed layout: [B, M] lengths
  and [B, M + 1] first columns of documents 1..M, -1 where a row has fewer. Documents are the
  row's segments 1, 2, ... laid out left to right from column 0 (PackedChunks' rows)."""
  ids = jnp.arange(1, max_docs + 1, dtype=seg_BL.dtype)
  lengths_BM = (seg_BL[:, None, :] == ids[None, :, None]).sum(-1, dtype=jnp.int32)
  starts_BM = jnp.cumsum(lengths_BM, -1) - lengths_BM
  present = lengths_BM > 0
  lengths_BM = jnp.where(present, lengths_BM, -1)
  offsets_BM = jnp.where(present, starts_BM, -1)
  offsets_BM1 = jnp.concatenate([offsets_BM, jnp.full_like(offsets_BM[:, :1], -1)], -1)
  return lengths_BM, offsets_BM1


def cudnn_attention(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal: bool, max_docs: int) -> jax.Array:
  """cuDNN flash attention (bf16/fp16, Hopper) in the packed layout: per-row document lengths
  and offsets instead of a mask, so no [B, H, L, T] bias is built or differentiated. Reaches
  into jax's cuDNN module (the public `jax.nn.dot_product_attention` has no packed-document
  argument); padding columns get no document and an unused output."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  lengths_BM, offsets_BM1 = packed_offsets(seg_BL, max_docs)
  mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
  out_BLHK = cudnn.dot_product_attention(
      q_BLHK, k_BLHK, v_BLHK, q_seqlen=lengths_BM, kv_seqlen=lengths_BM,
      q_offsets=offsets_BM1, kv_offsets=offsets_BM1,
      scale=1.0 / math.sqrt(q_BLHK.shape[-1]), mask_type=mask_type, qkv_layout="BTNH")
  # columns in no document are never written: zero them (garbage there would reach the loss
  # as NaN * 0), and no gradient flows back through them
  return jnp.where((seg_BL > 0)[:, :, None, None], out_BLHK, 0).astype(q_BLHK.dtype)


def _splash_kernel(num_heads: int, L: int, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  head = masks.CausalMask((L, L)) if causal else masks.FullMask((L, L))
  b = min(512, L)
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                            block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return splash.make_splash_mha(masks.MultiHeadMask([head] * num_heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def tokamax_attention(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal: bool, interpret: bool):
  """tokamax's flash attention (Mosaic GPU, Hopper: FlashAttention-3-style warp-specialised
  kernels) with each query's document as its key range: keys [first, last] of its segment
  (`segment_extent`), causal up to itself; the kernel skips key tiles outside a query tile's
  ranges. `interpret` (CPU tests): tokamax's XLA reference, the same mask. Reaches into
  tokamax's op classes (its public `dot_product_attention` takes a dense mask only)."""
  from tokamax._src.ops.attention import base as tk_base
  from tokamax._src.ops.attention import pallas_mosaic_gpu as tk_mosaic
  first_BL, last_BL = segment_extent(seg_BL)
  mask = tk_base.Mask(k_start=first_BL[:, None, :],
                      k_end=None if causal else (last_BL + 1)[:, None, :], is_causal=causal)
  op = tk_base.DotProductAttention() if interpret else tk_mosaic.PallasMosaicGpuFlashAttention()
  return op(q_BLHK, k_BLHK, v_BLHK, mask=mask,
            logits_scale=1.0 / math.sqrt(q_BLHK.shape[-1])).astype(q_BLHK.dtype)


def splash_attention(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal: bool, interpret: bool):
  """Pallas splash attention (TPU) with segment ids; vmapped over rows (the kernel takes one
  row's [H, L, K]). Padding attends to padding: unused outputs, and no row without a key."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  B, L, H, K = q_BLHK.shape
  kernel = _splash_kernel(H, L, causal, interpret)
  scaled_BLHK = q_BLHK * jnp.asarray(1.0 / math.sqrt(K), q_BLHK.dtype)
  seg_BL = seg_BL.astype(jnp.int32)
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
  out_BHLK = jax.vmap(one)(*(x.transpose(0, 2, 1, 3) for x in (scaled_BLHK, k_BLHK, v_BLHK)),
                           seg_BL)
  return out_BHLK.transpose(0, 2, 1, 3)


# The kernels XLA cannot partition over a mesh (Pallas's Triton and Mosaic custom calls,
# tokamax's): on several devices each runs on its own rows and heads inside a shard_map. The
# mesh axes that split a batch's rows and the heads: train/sharding.py's RULES for the logical
# `batch` and `heads` (test_attention checks that they agree).
PER_SHARD = ("cpu_docs", "pallas", "pallas_docs", "tokamax", "splash")
ROW_AXES, HEAD_AXES = ("data", "fsdp"), ("tensor",)


_MESH = contextvars.ContextVar("attention_mesh", default=None)


@contextlib.contextmanager
def on_mesh(mesh):
  """A context for tracing a function whose attention kernels run per shard of `mesh` (the
  concrete mesh: shard_map executes on its devices, or compiles for them)."""
  token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(token)


def _shard_map(kernel, args, specs):
  """kernel(*args) on one device or outside `on_mesh`; on the mesh of `on_mesh` with several
  devices a shard_map of it, each argument split as `specs(split)` says (a PartitionSpec per
  argument, then the outputs'), `split(axes, n)` naming the mesh's axes among `axes` if
  they divide n, else None (every device then has all n: a model init's one dummy row)."""
  mesh = _MESH.get()
  if mesh is None or mesh.size == 1:
    return kernel(*args)
  context = jax.sharding.get_abstract_mesh()   # lowering for another platform (bench lower):
  mesh = mesh if context.empty else context     # its target's abstract mesh, the same axes

  def split(axes, n):
    axes = tuple(a for a in axes if a in mesh.axis_names)
    return axes if axes and n % math.prod(mesh.shape[a] for a in axes) == 0 else None

  *in_specs, out_specs = specs(split)
  return jax.shard_map(kernel, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                       check_vma=False)(*args)


def per_shard(kernel, q_BLHK, k_BLHK, v_BLHK, seg_BL):
  """kernel(q, k, v, seg) -> [B, L, H, K], run by each device on its rows and heads where the
  mesh of `on_mesh` has several devices: attention never mixes rows or heads, so the shards'
  results are the whole one's. Directly on one device or outside `on_mesh`."""
  B, _, H, _ = q_BLHK.shape

  def specs(split):
    x = jax.sharding.PartitionSpec(split(ROW_AXES, B), None, split(HEAD_AXES, H), None)
    return x, x, x, jax.sharding.PartitionSpec(split(ROW_AXES, B), None), x

  return _shard_map(kernel, (q_BLHK, k_BLHK, v_BLHK, seg_BL), specs)


def per_shard_rows(kernel, rows, whole):
  """kernel(*rows, *whole) -> a tree of arrays shaped like rows[0], run by each device on its
  rows (the leading dim of each of `rows`, [B, ...]; None entries pass through) with every
  one of `whole` (vectors: a norm's params) where the mesh of `on_mesh` has several devices:
  the kernel never mixes rows. A gradient of a `whole` argument is each device's sum over its
  rows, added up over the devices."""
  B = rows[0].shape[0]
  out = jax.eval_shape(kernel, *rows, *whole)

  def specs(split):
    row = jax.sharding.PartitionSpec(split(ROW_AXES, B))
    return (*[row] * len(rows), *[jax.sharding.PartitionSpec()] * len(whole),
            jax.tree.map(lambda _: row, out))

  return _shard_map(kernel, (*rows, *whole), specs)


def self_attention(impl: str, q_BLHK, k_BLHK, v_BLHK, pos_BL, seg_BL, causal: bool,
                   interpret: bool = False, max_docs: int | None = None,
                   launch: str = "") -> jax.Array:
  """Attention of a packed batch over itself (training, prefill without a cache) by `impl`;
  `max_docs`: the most documents a row holds (cudnn's packed layout; 0/None or more than L:
  L); `launch`: pallas_docs' launch as model.flash_launch names it ("": the tuned default,
  flash_docs.LAUNCH).

  Rows of a length the kernel's tiles cannot cover (`length_unsupported`: the probes' rows of
  the longest bio or name, GBERT's fill-mask rows; data.seq_len itself is validated) run
  `xla` instead: they are short, and the flash kernels would refuse them."""
  if impl == "pallas_docs":
    from kstore_jax.model import flash_docs   # Pallas: imported where it runs
    parsed = flash_docs.parse_launch(launch)
  block = parsed.block if impl == "pallas_docs" else PALLAS_TILE
  if length_unsupported(impl, q_BLHK.shape[1], block):
    impl = "xla"
  if impl in PER_SHARD:
    if impl == "pallas_docs":
      kernel = functools.partial(flash_docs.attention, launch=parsed)
    elif impl == "cpu_docs":
      kernel = cpu_attention.kernel
    else:
      kernel = {"pallas": pallas_attention, "tokamax": tokamax_attention,
                "splash": splash_attention}[impl]
    return per_shard(lambda q, k, v, seg: kernel(q, k, v, seg, causal, interpret),
                     q_BLHK, k_BLHK, v_BLHK, seg_BL)
  if impl == "cudnn":
    L = q_BLHK.shape[1]
    return cudnn_attention(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal, min(max_docs or L, L))
  k_BHTK, v_BHTK = k_BLHK.transpose(0, 2, 1, 3), v_BLHK.transpose(0, 2, 1, 3)
  m = mask(pos_BL, seg_BL, pos_BL, seg_BL, causal)
  if impl == "xla":
    return xla_attention(q_BLHK, k_BHTK, v_BHTK, m)
  return einsum_attention(q_BLHK, k_BHTK, v_BHTK, m, CAUSAL_BLOCKS if causal else 1)


def cached_attention(impl: str, q_BLHK, k_BHTK, v_BHTK, q_pos_BL, q_seg_BL, k_pos_BT, k_seg_BT,
                     causal: bool) -> jax.Array:
  """Attention of L new queries against a KV cache's columns (decoding): `einsum` (and
  `cpu_docs`, a CPU's) runs `einsum`, anything else jax's XLA attention."""
  m = mask(q_pos_BL, q_seg_BL, k_pos_BT, k_seg_BT, causal)
  if impl in ("einsum", "cpu_docs"):
    return einsum_attention(q_BLHK, k_BHTK, v_BHTK, m)
  return xla_attention(q_BLHK, k_BHTK, v_BHTK, m)
