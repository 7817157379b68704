"""Batched greedy generation: prefill the prompts, then one token per step with a KV cache.

Prompts come right-padded: row b's prompt is prompt_BP[b, :len_b]; its generated tokens take
positions len_b, len_b + 1, ..., so rows of different lengths decode together.
`generate_recompute` is the same decoding without a cache (the whole sequence is re-run each
step): the baseline for the speed benchmark.
`fill_masks` answers with a bidirectional model (model.causal=False): prompt + mask tokens.
"""

import functools

import jax
import jax.numpy as jnp

from kstore_jax.model.transformer import Transformer, init_cache


def greedy(logits_BV: jax.Array) -> jax.Array:
  """argmax over the last axis (the first index of the maximum), as two plain reductions:
  XLA:CPU runs `jnp.argmax`'s (value, index) pair reduction ~3x slower over a vocabulary."""
  max_B1 = logits_BV.max(-1, keepdims=True)
  vocab = logits_BV.shape[-1]
  iota = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, logits_BV.ndim - 1)
  return jnp.where(logits_BV == max_B1, iota, vocab).min(-1)


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def generate(model: Transformer, params, prompt_BP, lens_B, max_new: int):
  """Greedy tokens [B, max_new] (everything after the first EOS is left as generated).

  The prompts are moved to the right end of their rows (left padding, segment 0), so every
  row's next token goes to the same cache column and each step writes the cache in place.
  The prefill caches every prompt token but the last (its logits are unused, so XLA drops the
  vocabulary projection of the prompt positions); decode step t feeds the token at position
  len_b - 1 + t (the prompt's last token first) and emits generated token t: max_new
  single-token steps, none wasted.
  """
  B, P = prompt_BP.shape
  src_BP = jnp.arange(P)[None] - (P - lens_B)[:, None]      # left-padded column -> prompt index
  valid_BP = src_BP >= 0
  left_BP = jnp.where(valid_BP, jnp.take_along_axis(prompt_BP, jnp.maximum(src_BP, 0), 1), 0)
  cache = init_cache(model.cfg, B, P - 1 + max_new)
  if P > 1:
    _, _, cache = model.apply({"params": params}, left_BP[:, :-1],
                              jnp.maximum(src_BP[:, :-1], 0),
                              valid_BP[:, :-1].astype(jnp.int32), cache=cache)

  def body(carry, t):
    tok_B, cache = carry
    pos_B1 = (lens_B - 1 + t)[:, None]
    logits_B1V, _, cache = model.apply({"params": params}, tok_B[:, None], pos_B1,
                                       jnp.ones_like(pos_B1), cache=cache)
    nxt_B = greedy(logits_B1V[:, 0])
    return (nxt_B, cache), nxt_B

  _, toks_TB = jax.lax.scan(body, (left_BP[:, -1].astype(jnp.int32), cache), jnp.arange(max_new))
  return toks_TB.T


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def generate_recompute(model: Transformer, params, prompt_BP, lens_B, max_new: int):
  """The same greedy decoding, re-running the full sequence for every new token."""
  B, P = prompt_BP.shape
  seq_BT = jnp.concatenate([prompt_BP, jnp.zeros((B, max_new), prompt_BP.dtype)], 1)
  positions_BT = jnp.broadcast_to(jnp.arange(P + max_new), (B, P + max_new))

  def body(seq_BT, t):
    seg_BT = (positions_BT < (lens_B + t)[:, None]).astype(jnp.int32)
    logits_BTV, _, _ = model.apply({"params": params}, seq_BT, positions_BT, seg_BT)
    nxt_B = greedy(logits_BTV[jnp.arange(B), lens_B + t - 1])
    return seq_BT.at[jnp.arange(B), lens_B + t].set(nxt_B), nxt_B

  _, toks_TB = jax.lax.scan(body, seq_BT, jnp.arange(max_new))
  return toks_TB.T


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def fill_masks(model: Transformer, params, prompt_BP, lens_B, answer_lens_B, mask_id,
               max_new: int):
  """Bidirectional (GBERT) answers: each prompt followed by answer_lens_B[b] mask tokens, all
  predicted in one forward pass. Returns the argmax tokens [B, max_new] at positions len_b,
  len_b + 1, ... (those past a row's answer length are not meaningful)."""
  B, P = prompt_BP.shape
  seq_BT = jnp.concatenate([prompt_BP, jnp.zeros((B, max_new), prompt_BP.dtype)], 1)
  positions_BT = jnp.broadcast_to(jnp.arange(P + max_new), seq_BT.shape)
  end_B1 = (lens_B + answer_lens_B)[:, None]
  masked_BT = (positions_BT >= lens_B[:, None]) & (positions_BT < end_B1)
  seq_BT = jnp.where(masked_BT, mask_id, seq_BT).astype(jnp.int32)
  logits_BTV, _, _ = model.apply({"params": params}, seq_BT, positions_BT,
                                 (positions_BT < end_B1).astype(jnp.int32))
  at_BA = jnp.minimum(lens_B[:, None] + jnp.arange(max_new), P + max_new - 1)
  return greedy(jnp.take_along_axis(logits_BTV, at_BA[..., None], 1))
