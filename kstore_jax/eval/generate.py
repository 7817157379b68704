"""Batched greedy generation: prefill the prompts, then one token per step with a KV cache.

Prompts are right-padded: row b's prompt is prompt_BP[b, :len_b]. Its generated tokens are
written at positions len_b, len_b + 1, ... (padding slots carry segment 0 until overwritten),
so rows of different lengths decode together. `generate_recompute` is the same decoding without
a cache (the whole sequence is re-run each step): the baseline for the speed benchmark.
`fill_masks` answers with a bidirectional model (model.causal=False): prompt + mask tokens.
"""

import functools

import jax
import jax.numpy as jnp

from kstore_jax.model.transformer import Transformer, init_cache


def _valid(prompt_BP, lens_B):
  return (jnp.arange(prompt_BP.shape[1])[None] < lens_B[:, None]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def generate(model: Transformer, params, prompt_BP, lens_B, max_new: int):
  """Greedy tokens [B, max_new] (everything after the first EOS is left as generated).

  The prefill caches the keys/values of each prompt but its last token (columns P-1 and on are
  never needed: a row's last prompt token is at most column P-1); its logits are unused, so XLA
  drops the vocabulary projection of the prompt positions. Decode step t feeds the token at
  position len_b - 1 + t (the prompt's last token first) and emits generated token t:
  max_new single-token steps, none wasted.
  """
  B, P = prompt_BP.shape
  cache = init_cache(model.cfg, B, P - 1 + max_new)
  if P > 1:
    head_BP = prompt_BP[:, :P - 1]
    positions = jnp.broadcast_to(jnp.arange(P - 1), head_BP.shape)
    _, _, cache = model.apply({"params": params}, head_BP, positions,
                              _valid(head_BP, lens_B - 1), cache=cache)
  last_B = prompt_BP[jnp.arange(B), lens_B - 1].astype(jnp.int32)

  def body(carry, t):
    tok_B, cache = carry
    pos_B1 = (lens_B - 1 + t)[:, None]
    logits_B1V, _, cache = model.apply({"params": params}, tok_B[:, None], pos_B1,
                                       jnp.ones_like(pos_B1), cache=cache)
    nxt_B = jnp.argmax(logits_B1V[:, 0], -1).astype(jnp.int32)
    return (nxt_B, cache), nxt_B

  _, toks_TB = jax.lax.scan(body, (last_B, cache), jnp.arange(max_new))
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
  return jnp.argmax(jnp.take_along_axis(logits_BTV, at_BA[..., None], 1), -1).astype(jnp.int32)
