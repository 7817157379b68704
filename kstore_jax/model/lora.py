"""LoRA as a pure transform of a param tree.

`init(rng, base, rank, embed_rank)` makes rank-r factors for every attention query and value
kernel (and a rank-r' factor pair for the input embedding); B (the second factor) starts at
zero, so `merge(base, lora)` equals `base` until training moves it. Only the LoRA tree is
optimised; `merge` gives the effective params for the forward pass and for evaluation.
"""

import jax
import jax.numpy as jnp

TARGETS = ("query", "value")


def _blocks(base):
  return sorted(k for k in base if k.startswith("block"))


def init(rng, base, rank: int, embed_rank: int = 0):
  lora = {}
  keys = iter(jax.random.split(rng, 2 * len(_blocks(base)) + 1))
  for b in _blocks(base):
    for t in TARGETS:
      kernel = base[b]["attn"][t]["kernel"]               # [D, H, K]
      d = kernel.shape[0]
      lora.setdefault(b, {})[t] = {
          "a": jax.random.normal(next(keys), (d, rank), jnp.float32) / jnp.sqrt(d),
          "b": jnp.zeros((rank,) + kernel.shape[1:], jnp.float32)}
  if embed_rank:
    table = base["embed"]["embedding"]                    # [V, D]
    lora["embed"] = {
        "a": jax.random.normal(next(keys), (table.shape[0], embed_rank), jnp.float32),
        "b": jnp.zeros((embed_rank, table.shape[1]), jnp.float32)}
  return lora


def _delta(f, alpha):
  rank = f["a"].shape[1]
  return jnp.tensordot(f["a"], f["b"], axes=1) * (alpha / rank)


def merge(base, lora, alpha: float = 1.0):
  """Effective params: base + (alpha / r) * A @ B on each LoRA target."""
  out = dict(base)
  for b in _blocks(base):
    if b not in lora:
      continue
    for t in TARGETS:
      node = dict(out[b]["attn"][t])
      node["kernel"] = node["kernel"] + _delta(lora[b][t], alpha).astype(node["kernel"].dtype)
      out[b] = {**out[b], "attn": {**out[b]["attn"], t: node}}
  if "embed" in lora:
    out["embed"] = {**out["embed"],
                    "embedding": out["embed"]["embedding"] + _delta(lora["embed"], alpha)}
  return out


def flops_per_position(model_cfg, rank: int, embed_rank: int, positions_per_step: int) -> float:
  """FLOPs a LoRA finetune spends a position beyond a frozen base's 4N (flops_per_token's
  'inputs'): autodiff forms each merged weight's dense gradient before its factors' (2 a weight
  a position: every query and value kernel; with an embedding factor and a tied head, the
  head's), and each step merges the factors and takes theirs from it (6 a factor weight: A @ B,
  dW @ B^T, A^T @ dW), spread over the step's positions."""
  d, layers, vocab = model_cfg.d_model, model_cfg.num_layers, model_cfg.vocab_size
  targets = layers * len(TARGETS)
  dense = 2 * (targets * d * d + (vocab * d if embed_rank and model_cfg.tie_embeddings else 0))
  per_step = 6 * (targets * d * d * rank + vocab * d * embed_rank)
  return dense + per_step / positions_per_step

