"""A GPT-2 (pre-LN, rotary) or Llama (RMSNorm, SwiGLU) transformer in flax.linen.

Params are a plain pytree; `model.apply({'params': p}, tokens_BL, ...)` is pure. Every weight
carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`) mapped to the mesh by
train/sharding.py. Documents packed in one row are isolated by `segment_ids_BL` (attention only
within a segment) and `positions_BL` restart at 0 per document.

Decoding uses an explicit KV cache pytree (`init_cache`: `{'k', 'v': per layer [B, H, T, K],
'seg', 'pos': [B, T], 'index'}`) passed in and returned (so it stays a pure function); a call
writes its L tokens at columns [index, index + L) of every row.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kstore_jax.model import attention as attention_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# model.remat: what each block keeps for the backward pass (jax.checkpoint policies); 'none'
# keeps everything (no recomputation), 'full' only the block's input
REMAT_POLICIES = {
    "none": None, "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,   # matmul outputs kept, the rest recomputed
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# model.norm: `xla` (XLA's own fusions) or `pallas` (the residual add and the norm after it in
# one Triton kernel, fused_norm.py: CUDA; interpreted on a CPU, for tests); `auto`: pallas on
# CUDA, xla elsewhere
NORMS = {"xla": ("cpu", "cuda", "rocm", "tpu"), "pallas": ("cpu", "cuda")}


def resolve_norm(norm: str, platform: str) -> str:
  """`auto` -> the platform's norm kernel (NORMS); other names pass through."""
  if norm != "auto":
    return norm
  return "pallas" if platform == "cuda" else "xla"


def rotary_dims(head_dim: int, fraction: float) -> int:
  """Rotated dims of a head: `fraction` of head_dim, rounded down to an even number."""
  return int(head_dim * fraction) // 2 * 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  d_model: int = 128
  d_ff: int = 512
  rotary_fraction: float = 0.25
  rotary_base: float = 10000.0
  block: str = "gpt2"            # 'gpt2' | 'llama'
  causal: bool = True
  dtype: str = "float32"         # compute dtype (resolved: not 'auto'); params stay float32
  tie_embeddings: bool = True
  remat: str = "none"            # a REMAT_POLICIES name: what the backward pass recomputes
  scan_layers: bool = False      # training: one scanned block instead of num_layers unrolled
  max_docs: int = 0              # the most documents a packed row holds (cudnn); 0: its length
  attention: str = "einsum"      # an `attention.IMPLEMENTATIONS` name (resolved: not 'auto')
  flash_launch: str = ""         # pallas_docs' launch (flash_docs.parse_launch; "": LAUNCH)
  norm: str = "xla"              # a NORMS name (resolved: not 'auto'): how the residual adds
                                 # and the norms after them run
  platform: str = "cpu"          # what the model is lowered for: cpu | cuda | rocm | tpu

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def rotary_dim(self) -> int:
    """Rotated dims per head (rotary_dims; Llama's configs set the fraction to 1)."""
    return rotary_dims(self.head_dim, self.rotary_fraction)

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int, platform: str) -> "ModelConfig":
    """The model of config section `model_cfg` lowered for `platform`: `auto` dtype and
    attention resolved for it (`attention.resolve_dtype`, `attention.resolve`)."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "platform", "max_docs"}
    kw = {k: model_cfg[k] for k in fields if k in model_cfg}
    kw["dtype"] = attention_lib.resolve_dtype(kw.get("dtype", "auto"), platform)
    kw["attention"] = attention_lib.resolve(kw.get("attention", "auto"), platform)
    kw["norm"] = resolve_norm(kw.get("norm", "auto"), platform)
    if isinstance(kw.get("remat"), bool):   # configs written when remat was a bool
      kw["remat"] = "full" if kw["remat"] else "none"
    return cls(vocab_size=vocab_size, platform=platform, **kw)


def _init(init_fn, *axes):
  return nn.with_logical_partitioning(init_fn, axes)


def rotary_tables(positions_BL: jax.Array, rot_dim: int, base: float, head_dim: int):
  """NeoX rotary embedding as two [B, L, K] f32 tables (cos, sin; K = head_dim) such that
  `rotary(x) = x * cos + swap_halves(x) * sin`: over the first rot_dim dims cos is each pair's
  cosine and sin its sine, negated on the first half; past them 1 and 0 (dims left as they
  are). Computed once per forward pass, shared by every layer's queries and keys."""
  half = rot_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLE = positions_BL[..., None].astype(jnp.float32) * inv_freq
  cos_BLE, sin_BLE = jnp.cos(angle_BLE), jnp.sin(angle_BLE)
  rest = jnp.zeros((*positions_BL.shape, head_dim - rot_dim), jnp.float32)
  tables = (jnp.concatenate([cos_BLE, cos_BLE, rest + 1], -1),
            jnp.concatenate([-sin_BLE, sin_BLE, rest], -1))
  # The barrier keeps XLA from fusing (re-evaluating) cos and sin into every layer's rotary.
  return jax.lax.optimization_barrier(tables)


def swap_halves(x: jax.Array, rot_dim: int) -> jax.Array:
  """x with the two halves of its first rot_dim trailing dims exchanged (the dims after them
  come back unchanged or permuted: `rotary` multiplies them by 0)."""
  K = x.shape[-1]
  if K % rot_dim == 0:   # a reversal of a reshape: no concatenation (slow in XLA:CPU loops)
    return jnp.flip(x.reshape(*x.shape[:-1], K // rot_dim, 2, rot_dim // 2), -2).reshape(x.shape)
  half = rot_dim // 2
  return jnp.concatenate([x[..., half:rot_dim], x[..., :half], x[..., rot_dim:]], -1)


def rotary(x_BLHK: jax.Array, tables, rot_dim: int) -> jax.Array:
  """NeoX-style rotary embedding on the first `rot_dim` dims of each head (`rotary_tables`):
  each pair (x1, x2) = (x[i], x[i + rot_dim / 2]) becomes (x1 cos - x2 sin, x2 cos + x1 sin)."""
  if rot_dim == 0:
    return x_BLHK
  cos_BL1K, sin_BL1K = (t[:, :, None] for t in tables)
  x = x_BLHK.astype(jnp.float32)
  return (x * cos_BL1K + swap_halves(x, rot_dim) * sin_BL1K).astype(x_BLHK.dtype)


class NormParams(nn.Module):
  """A norm's params as flax's LayerNorm (`scale`, `bias`) or RMSNorm (`scale`) declares them,
  for the fused kernel (the same names, init and logical axes: one checkpoint layout)."""
  kind: str

  @nn.compact
  def __call__(self, d: int):
    scale = self.param("scale", _init(nn.initializers.ones, "embed"), (d,))
    if self.kind == "llama":
      return scale, None
    return scale, self.param("bias", _init(nn.initializers.zeros, "embed"), (d,))


class AddNorm(nn.Module):
  """(s, y): the residual stream x plus a sub-layer's output h (and its projection's bias hb,
  when the projection left it: `Proj.defer_bias`), and s normalised (GPT-2: LayerNorm; Llama:
  RMSNorm) in the compute dtype. h and hb None: s is x. `cfg.norm` pallas: one kernel
  (fused_norm.py), run per shard on a mesh of several devices; xla: the add, then flax's
  norm. `copies` > 1: y as a tuple of that many copies, one for each consumer (the kernel
  sums their cotangents: `fused_norm.add_norm`)."""
  cfg: ModelConfig
  copies: int = 1

  @nn.compact
  def __call__(self, x_BLD, h_BLD=None, hb_D=None):
    cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
    if cfg.norm == "xla":
      s_BLD = x_BLD if h_BLD is None else x_BLD + (h_BLD if hb_D is None else h_BLD + hb_D)
      if cfg.block == "llama":
        y_BLD = nn.RMSNorm(dtype=dtype, scale_init=_init(nn.initializers.ones, "embed"))(s_BLD)
      else:
        y_BLD = nn.LayerNorm(dtype=dtype, scale_init=_init(nn.initializers.ones, "embed"),
                             bias_init=_init(nn.initializers.zeros, "embed"))(s_BLD)
      return s_BLD, (y_BLD,) * self.copies if self.copies > 1 else y_BLD
    from kstore_jax.model import fused_norm   # Pallas: imported where it runs
    kind = "RMSNorm_0" if cfg.block == "llama" else "LayerNorm_0"
    scale_D, shift_D = NormParams(cfg.block, name=kind)(x_BLD.shape[-1])

    def kernel(x_BLD, h_BLD, hb_D, scale_D, shift_D):   # (a shard's rows on a mesh)
      flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])
      s_ZD, ys_ZD = fused_norm.add_norm(flat(x_BLD), flat(h_BLD), hb_D, scale_D, shift_D,
                                        1e-6, interpret=cfg.platform == "cpu",
                                        copies=self.copies)
      return jax.tree.map(lambda a: a.reshape(x_BLD.shape), (s_ZD, ys_ZD))

    return attention_lib.per_shard_rows(kernel, (x_BLD, h_BLD), (hb_D, scale_D, shift_D))


def flat_matmul(x, kernel_IO, n_in: int, platform: str = "", out_dtype=None) -> jax.Array:
  """x's trailing n_in dims (I elements in all) times kernel_IO as ONE 2-D matmul
  [tokens, I] x [I, O]; returns [tokens, O] (the caller restores x's leading dims), in
  `out_dtype` when given (accumulated in it: the output head's f32 logits), else in the
  operands' dtype. With the
  batch and length dims kept apart, XLA:CPU computes the weight gradient through a transposed
  copy of the [tokens, O] cotangent (half of an MLP's backward time at `small`). On the CPU a
  tall kernel (I > O: the MLP's down projection) gets its gradient as the transpose of
  [O, tokens] x [tokens, I] (`_tall_matmul`)."""
  x_NI = x.reshape(-1, kernel_IO.shape[0])
  if platform == "cpu" and kernel_IO.shape[0] > kernel_IO.shape[1] and out_dtype is None:
    return _tall_matmul(x_NI, kernel_IO)
  return jnp.dot(x_NI, kernel_IO, preferred_element_type=out_dtype)


@jax.custom_vjp
def _tall_matmul(x_NI, kernel_IO):
  """x_NI · kernel_IO whose kernel gradient is computed as (dy_NOᵀ · x_NI)ᵀ. XLA:CPU runs the
  plain x_NIᵀ · dy_NO with its tall [I, O] output at half a core's matmul rate (tiny's
  [8192, 512] x [8192, 128]: 20 ms against 11 ms for the wide [O, I] product, BENCHMARKS.md);
  the barrier keeps its simplifier from folding the transpose back into the dot. The same sums
  over tokens, so the same gradient up to float summation order."""
  return jnp.dot(x_NI, kernel_IO)


def _tall_matmul_fwd(x_NI, kernel_IO):
  return jnp.dot(x_NI, kernel_IO), (x_NI, kernel_IO)


def _tall_matmul_bwd(res, dy_NO):
  x_NI, kernel_IO = res
  dkernel_OI = jax.lax.optimization_barrier(jnp.dot(dy_NO.T, x_NI))
  return jnp.dot(dy_NO, kernel_IO.T), dkernel_OI.T.astype(kernel_IO.dtype)


_tall_matmul.defvjp(_tall_matmul_fwd, _tall_matmul_bwd)


class Proj(nn.Module):
  """x's trailing fan-in dims contracted with an explicitly shaped, logically named kernel
  `shape = fan-in dims + n_out output dims` (+ bias)."""
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  n_out: int            # trailing kernel dims that are output dims (bias shape)
  use_bias: bool
  std: float
  dtype: Any
  platform: str = ""    # ModelConfig.platform: the CPU computes a tall kernel's gradient apart
  out_dtype: Any = None   # the product's dtype (accumulated in it); None: `dtype`
  activation: Any = None  # applied after the bias (off the CPU recomputed in the backward)
  defer_bias: bool = False   # return (product, bias or None): the caller adds the bias

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _init(nn.initializers.normal(self.std), *self.axes),
                        self.shape)
    n_in = len(self.shape) - self.n_out
    y = flat_matmul(x.astype(self.dtype),
                    kernel.astype(self.dtype).reshape(math.prod(self.shape[:n_in]), -1), n_in,
                    self.platform, self.out_dtype)
    bias = None
    if self.use_bias:   # on the 2-D product: a row broadcast XLA fuses, not a full-size copy
      bias = self.param("bias", _init(nn.initializers.zeros, *self.axes[-self.n_out:]),
                        self.shape[-self.n_out:]).astype(self.dtype).reshape(-1)
    if self.defer_bias:
      return y.reshape(*x.shape[:x.ndim - n_in], *self.shape[n_in:]), bias
    if self.activation is None:
      y = y if bias is None else y + bias
    else:
      # off the CPU the backward recomputes bias and activation from the product (kept anyway:
      # a GEMM's output) instead of reading what the forward saved: the forward writes the
      # activation alone, not also its biased input (BENCHMARKS.md "The step's floor")
      act = lambda y, b: self.activation(y if b is None else y + b)
      y = (act if self.platform == "cpu" else jax.checkpoint(act))(y, bias)
    return y.reshape(*x.shape[:x.ndim - n_in], *self.shape[n_in:])


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, rot, cache=None, layer=0):
    """x_BLD: the normalised rows, or a tuple of three copies of them, one for each of the
    query, key and value projections (`AddNorm.copies`: their cotangents kept apart)."""
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    bias = cfg.block == "gpt2"
    xq_BLD, xk_BLD, xv_BLD = x_BLD if isinstance(x_BLD, tuple) else (x_BLD,) * 3
    proj = lambda name, defer=False: Proj((cfg.d_model, cfg.num_heads, cfg.head_dim),
                                          ("embed", "heads", "kv"), 2, bias, 0.02, dtype,
                                          cfg.platform, defer_bias=defer, name=name)
    q_BLHK, k_BLHK = proj("query")(xq_BLD), proj("key")(xk_BLD)
    # Off the CPU the values' bias is not added to every value: a query's weights sum to 1, so
    # attention passes the bias through to each output unchanged, and the out projection maps
    # it to a constant, added with the out projection's own bias (in the norm after: Block).
    # One [T, D] pass less forward and one bias-gradient reduction less backward, 1.3% of the
    # paper step's floor on a GPU (BENCHMARKS.md "The step's floor"); the CPU keeps its model.
    fold = bias and cfg.platform != "cpu"
    v_BLHK, v_bias_HK = proj("value", defer=True)(xv_BLD) if fold else (proj("value")(xv_BLD),
                                                                         None)
    q_BLHK = rotary(q_BLHK, rot, cfg.rotary_dim)
    k_BLHK = rotary(k_BLHK, rot, cfg.rotary_dim)
    if cache is None:
      out_BLHK = attention_lib.self_attention(
          cfg.attention, q_BLHK, k_BLHK, v_BLHK, positions_BL, segment_ids_BL, cfg.causal,
          interpret=cfg.platform == "cpu", max_docs=cfg.max_docs, launch=cfg.flash_launch)
    else:
      # Write this call's keys/values at columns [index, index + L) of this layer's head-major
      # cache: one dynamic-update-slice, the same columns for every row, done in place (each
      # layer's cache is its own buffer, threaded through the decode loop and read by the
      # attention matmuls directly, never sliced or copied). Attend to every column; unwritten
      # ones have segment 0.
      k_BHLK, v_BHLK = k_BLHK.transpose(0, 2, 1, 3), v_BLHK.transpose(0, 2, 1, 3)
      at = (0, 0, cache["index"], 0)
      k_BHTK, v_BHTK = (jax.lax.dynamic_update_slice(cache[n][layer],
                                                     x.astype(cache[n][layer].dtype), at)
                        for n, x in (("k", k_BHLK), ("v", v_BHLK)))
      put = lambda layers, x: layers[:layer] + (x,) + layers[layer + 1:]
      cache = dict(cache, k=put(cache["k"], k_BHTK), v=put(cache["v"], v_BHTK))
      out_BLHK = attention_lib.cached_attention(
          cfg.attention, q_BLHK, k_BHTK.astype(dtype), v_BHTK.astype(dtype), positions_BL,
          segment_ids_BL, cache["pos"], cache["seg"], cfg.causal)
    out = Proj((cfg.num_heads, cfg.head_dim, cfg.d_model), ("heads", "kv", "embed"), 1, bias,
               0.02 / math.sqrt(2 * cfg.num_layers), dtype, cfg.platform, defer_bias=True,
               name="out")
    out_BLD, out_bias_D = out(out_BLHK)
    if v_bias_HK is not None:
      out_bias_D = out_bias_D + out(v_bias_HK.reshape(1, cfg.num_heads, cfg.head_dim))[0][0]
    return out_BLD, out_bias_D, cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    bias = cfg.block == "gpt2"
    up = lambda name, act=None: Proj((cfg.d_model, cfg.d_ff), ("embed", "mlp"), 1, bias,
                                     0.02, dtype, cfg.platform, activation=act, name=name)
    if cfg.block == "llama":
      h_BLF = nn.silu(up("gate")(x_BLD)) * up("up")(x_BLD)
    else:
      # off the CPU the backward recomputes bias and GELU from the projection's product
      # instead of reading their saved input and tanh: two [T, F] tensors less written and
      # read a layer, 3.3% off the paper step's floor on a GPU (BENCHMARKS.md "The step's
      # floor"); the CPU, bound by arithmetic, has nothing measurable to gain (nor has Llama's
      # SiLU: its floor grew 2.6%)
      h_BLF = up("up", nn.gelu)(x_BLD)
    return Proj((cfg.d_ff, cfg.d_model), ("mlp", "embed"), 1, bias,
                0.02 / math.sqrt(2 * cfg.num_layers), dtype, cfg.platform, defer_bias=True,
                name="down")(h_BLF)


class Block(nn.Module):
  """One pre-norm block on the residual stream `stream` = (x, h, hb): the stream x and the
  last sub-layer's output h with its projection's bias hb, not yet added (each add happens
  in the norm after it: AddNorm). Returns (x, h, hb) of its MLP, and the cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, stream, positions_BL, segment_ids_BL, rot, cache=None, layer=0):
    # three copies of the normalised rows, one for each of attention's input projections: the
    # fused norm's backward sums their input gradients as it reads them, instead of XLA's sum
    # writing one more [T, D] array (0.9% of the paper step's floor on a GPU: BENCHMARKS.md
    # "Less memory traffic")
    x_BLD, ys_BLD = AddNorm(self.cfg, copies=3, name="ln1")(*stream)
    h_BLD, hb_D, new_cache = Attention(self.cfg, name="attn")(
        ys_BLD, positions_BL, segment_ids_BL, rot, cache, layer)
    x_BLD, y_BLD = AddNorm(self.cfg, name="ln2")(x_BLD, h_BLD, hb_D)
    h_BLD, hb_D = Mlp(self.cfg, name="mlp")(y_BLD)
    return (x_BLD, h_BLD, hb_D), new_cache


class Transformer(nn.Module):
  """Returns (logits_BLV in f32, final hidden_BLD, new cache or None)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, cache=None,
               embed_delta_VD=None):
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                     embedding_init=_init(nn.initializers.normal(0.02), "vocab", "embed"),
                     name="embed")
    table_VD = embed.embedding
    if embed_delta_VD is not None:   # probes' low-rank input-embedding update
      table_VD = table_VD + embed_delta_VD
    x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(dtype)
    if cache is not None:   # this call's tokens fill columns [index, index + L) of every row
      at = (0, cache["index"])
      cache = dict(cache, seg=jax.lax.dynamic_update_slice(cache["seg"], segment_ids_BL, at),
                   pos=jax.lax.dynamic_update_slice(cache["pos"], positions_BL, at))
    policy = REMAT_POLICIES[cfg.remat]
    rot = (rotary_tables(positions_BL, cfg.rotary_dim, cfg.rotary_base, cfg.head_dim)
           if cfg.rotary_dim else None)   # no rotary: `rotary` returns its input
    stream = (x_BLD, None, None)   # Block's residual stream: nothing pending yet
    if cfg.scan_layers and cache is None and not self.is_initializing():
      stream = self.scanned_blocks(x_BLD, positions_BL, segment_ids_BL, rot, policy)
    else:
      # Remat only where a backward pass follows: decoding (a cache) has none, and nn.remat
      # would trace the layer index that picks this block's arrays of the cache. Same params.
      block = nn.remat(Block, policy=policy) if policy is not None and cache is None else Block
      for i in range(cfg.num_layers):
        stream, cache = block(cfg, name=f"block{i}")(stream, positions_BL, segment_ids_BL,
                                                     rot, cache, i)
    if cache is not None:
      cache = dict(cache, index=cache["index"] + tokens_BL.shape[1])
    _, hidden_BLD = AddNorm(cfg, name="ln_f")(*stream)
    # logits accumulated and returned in f32 (as the training loss makes them): bf16-rounded
    # logits tie often and would make decoding disagree with the trained head
    if cfg.tie_embeddings:
      logits_BLV = flat_matmul(hidden_BLD, embed.embedding.astype(dtype).T, 1,
                               out_dtype=jnp.float32).reshape(*hidden_BLD.shape[:-1],
                                                              cfg.vocab_size)
    else:
      logits_BLV = Proj((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 1, False, 0.02, dtype,
                        cfg.platform, jnp.float32, name="unembed")(hidden_BLD)
    return logits_BLV, hidden_BLD, cache


  def scanned_blocks(self, x_BLD, positions_BL, segment_ids_BL, rot, policy):
    """The blocks as one `lax.scan` over their params stacked on a leading layer axis: XLA
    compiles one block instead of num_layers (compile time), same function. The params stay
    `block0`, `block1`, ... (checkpoints, LoRA and probes see one layout either way)."""
    params = self.variables["params"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *(params[f"block{i}"] for i in range(self.cfg.num_layers)))
    block = Block(self.cfg, parent=None)   # unbound: applied to each layer's params

    def body(stream, p):
      return block.apply({"params": p}, stream, positions_BL, segment_ids_BL, rot)[0], None

    if policy is not None:
      body = jax.checkpoint(body, policy=policy)
    # the carry's structure is each block's output: before the first, a zero output and (GPT-2's
    # projections have biases) a zero bias pending
    zero_hb = jnp.zeros((self.cfg.d_model,), x_BLD.dtype) if self.cfg.block == "gpt2" else None
    return jax.lax.scan(body, (x_BLD, jnp.zeros_like(x_BLD), zero_hb), stacked)[0]


def model_vocab(renderer) -> int:
  """The embedding and output width for a world's model ids (`renderer.vocab_size`), rounded up
  to a multiple of 128 (MXU/AVX-friendly, shardable)."""
  return -(-renderer.vocab_size // 128) * 128


def head_matrix(cfg: ModelConfig, params) -> jax.Array:
  """The output projection [D, V] in the compute dtype, as `Transformer` applies it to the final
  hidden states (the transposed embedding when tied)."""
  head_DV = params["embed"]["embedding"].T if cfg.tie_embeddings else params["unembed"]["kernel"]
  return head_DV.astype(DTYPES[cfg.dtype])


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """An empty KV cache of `length` columns: keys and values, one [B, H, T, K] array per layer
  (a tuple), each column's segment id (0 = empty) and position [B, T], and `index`, the first
  unwritten column."""
  shape = (batch, cfg.num_heads, length, cfg.head_dim)
  dtype = DTYPES[cfg.dtype]
  layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return {"k": layers(), "v": layers(),
          "seg": jnp.zeros((batch, length), jnp.int32),
          "pos": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


GRADS = {"weights": 6, "inputs": 4, "none": 2}   # FLOPs per weight per position


def flops_per_token(cfg: ModelConfig, seq_len: int, grads: str = "weights",
                    head: bool = True) -> float:
  """Training FLOPs per token, PaLM-style accounting: each weight's multiply-add is 2 FLOPs
  forward, 2 more for the gradient of its input and 2 for its own gradient (`grads`:
  'weights' = 6N, full training; 'inputs' = 4N, a frozen base that gradients pass through:
  LoRA, a probe with an embedding update; 'none' = 2N, forward only: a probe reading the
  hidden states), plus attention (QK^T and AV, no weights: 2 forward, 4 backward unless
  'none'). `head`: the output head runs (the probes stop at the hidden states)."""
  d, f, l = cfg.d_model, cfg.d_ff, cfg.num_layers
  mlp = (3 if cfg.block == "llama" else 2) * d * f
  per_layer = 4 * d * d + mlp
  n_matmul = l * per_layer + (cfg.vocab_size * d if head else 0)
  attn = 2 * l * seq_len * d   # QK^T and AV, causal average counted in full (as in MFU papers)
  return GRADS[grads] * n_matmul + (2 if grads == "none" else 6) * attn


def forward_flops(model_cfg, seq_len: int = 0) -> dict[str, float]:
  """Forward FLOPs per position by part, from the model's own count
  (`transformer.flops_per_token`, training = 3 x forward): `body` (the blocks' projections),
  `head` (the output head), `attention` (QK^T and AV over `seq_len` positions, causal counted
  in full, all layers), `cache_fill` (the body of a position whose outputs only fill a KV
  cache: the last layer's keys and values alone, its query, output projection and MLP
  feeding nothing)."""
  forward = lambda c, length: flops_per_token(c, length) / 3
  no_head = dataclasses.replace(model_cfg, vocab_size=0)
  body = forward(no_head, 0)
  last_layer = body / model_cfg.num_layers
  kv = 2 * 2 * model_cfg.d_model * model_cfg.d_model   # its key and value projections
  return dict(body=body, head=forward(model_cfg, 0) - forward(no_head, 0),
              attention=forward(model_cfg, seq_len) - forward(model_cfg, 0),
              cache_fill=body - last_layer + kv)
