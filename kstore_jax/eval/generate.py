"""Batched greedy generation: prefill the prompts, then one token per step with a KV cache.

Prompts are right-padded: row b's prompt is prompt_BP[b, :len_b]. Its generated tokens are
written at positions len_b, len_b + 1, ... (padding slots carry segment 0 until overwritten),
so rows of different lengths decode together. `generate_recompute` is the same decoding without
a cache (the whole sequence is re-run each step): the baseline for the speed benchmark.
"""

import functools

import jax
import jax.numpy as jnp

from kstore_jax.model.transformer import Transformer, init_cache


def _valid(prompt_BP, lens_B):
  return (jnp.arange(prompt_BP.shape[1])[None] < lens_B[:, None]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def generate(model: Transformer, params, prompt_BP, lens_B, max_new: int):
  """Greedy tokens [B, max_new] (everything after the first EOS is left as generated)."""
  B, P = prompt_BP.shape
  cache = init_cache(model.cfg, B, P + max_new)
  positions_BP = jnp.broadcast_to(jnp.arange(P), (B, P))
  logits_BPV, _, cache = model.apply({"params": params}, prompt_BP, positions_BP,
                                     _valid(prompt_BP, lens_B), cache=cache)
  first_B = jnp.argmax(logits_BPV[jnp.arange(B), lens_B - 1], -1).astype(jnp.int32)

  def body(carry, t):
    tok_B, cache = carry
    pos_B1 = (lens_B + t)[:, None]
    logits_B1V, _, cache = model.apply({"params": params}, tok_B[:, None], pos_B1,
                                       jnp.ones_like(pos_B1), cache=cache)
    nxt_B = jnp.argmax(logits_B1V[:, 0], -1).astype(jnp.int32)
    return (nxt_B, cache), tok_B

  _, toks_TB = jax.lax.scan(body, (first_B, cache), jnp.arange(max_new))
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
    nxt_B = jnp.argmax(logits_BTV[jnp.arange(B), lens_B + t - 1], -1).astype(jnp.int32)
    return seq_BT.at[jnp.arange(B), lens_B + t].set(nxt_B), nxt_B

  _, toks_TB = jax.lax.scan(body, seq_BT, jnp.arange(max_new))
  return toks_TB.T
