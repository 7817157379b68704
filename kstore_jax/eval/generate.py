"""Batched greedy generation: prefill the prompts, then one token per step with a KV cache.

Prompts come right-padded: row b's prompt is prompt_BP[b, :len_b]; its generated tokens take
positions len_b, len_b + 1, ..., so rows of different lengths decode together. Rows may share
a prefix (`Prefixes`: e.g. a QA question's wording before the name): each distinct prefix is
run once and its keys/values are copied into the cache of every row that starts with it.
Decoding stops once every row has emitted `eos_id`.
`generate_recompute` is the same decoding without a cache, the best simple one: every step
re-runs each row's whole sequence so far (prompt + the tokens generated so far, one compiled
length per step) and only its last position goes through the output head; each distinct
prefix is re-run once per step, not once per row. Nothing computed in one step is reused in
another. It is the baseline for the KV-cache speed benchmark (`bench eval`);
`generate_recompute_fixed_width` is the older, wasteful one (the full padded width every step,
every position through the head, whole questions).
`fill_masks` answers with a bidirectional model (model.causal=False): prompt + mask tokens.
`over_runs` runs either for several runs' params at once (a grid's eval: the same questions,
params stacked on a leading run axis).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kstore_jax.model.transformer import Transformer, forward_flops, head_matrix, init_cache


class Prefixes(NamedTuple):
  """Shared prompt beginnings: row b's full prompt is tokens_AS[of_B[b], :lens_A[of_B[b]]]
  followed by its own prompt."""
  tokens_AS: jax.Array
  lens_A: jax.Array
  of_B: jax.Array


def greedy(logits_BV: jax.Array) -> jax.Array:
  """argmax over the last axis (the first index of the maximum), as two plain reductions:
  XLA:CPU runs `jnp.argmax`'s (value, index) pair reduction ~3x slower over a vocabulary."""
  max_B1 = logits_BV.max(-1, keepdims=True)
  vocab = logits_BV.shape[-1]
  iota = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, logits_BV.ndim - 1)
  return jnp.where(logits_BV == max_B1, iota, vocab).min(-1)


def _left_pad(tokens_BP, lens_B):
  """Right-padded rows moved to the right end: (tokens, index within the row's prompt, 1 where
  a token is real), each [B, P]."""
  P = tokens_BP.shape[1]
  src_BP = jnp.arange(P)[None] - (P - lens_B)[:, None]
  valid_BP = src_BP >= 0
  src_BP = jnp.maximum(src_BP, 0)
  left_BP = jnp.where(valid_BP, jnp.take_along_axis(tokens_BP, src_BP, 1), 0)
  return left_BP, src_BP, valid_BP.astype(jnp.int32)


def _prefix_cache(apply, cfg, prefixes: Prefixes, batch: int, width: int):
  """Each distinct prefix run once (A rows), its keys/values copied in front of the `width`
  empty columns of each row that starts with it: (cache with index at the first empty column,
  each row's prefix length [B])."""
  A, S = prefixes.tokens_AS.shape
  _, _, shared = apply(*_left_pad(prefixes.tokens_AS, prefixes.lens_A),
                       cache=init_cache(cfg, A, S))
  cache = init_cache(cfg, batch, width)
  of_B = prefixes.of_B
  join = lambda axis: lambda mine, own: jnp.concatenate([mine[of_B], own], axis)
  cache = dict(k=tuple(map(join(2), shared["k"], cache["k"])),
               v=tuple(map(join(2), shared["v"], cache["v"])),
               seg=join(1)(shared["seg"], cache["seg"]),
               pos=join(1)(shared["pos"], cache["pos"]), index=shared["index"])
  return cache, prefixes.lens_A[of_B]


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def generate(model: Transformer, params, prompt_BP, lens_B, max_new: int, eos_id=-1,
             prefixes: Prefixes | None = None):
  """Greedy tokens [B, max_new]; after a row's first eos_id the rest is not meaningful (eos_id
  -1: run all max_new steps).

  The prompts are moved to the right end of their rows (left padding, segment 0), so every
  row's next token goes to the same cache column and each step writes the cache in place.
  The prefill caches every prompt token but the last (its logits are unused, so XLA drops the
  vocabulary projection of the prompt positions); decode step t feeds the token at position
  len_b - 1 + t (the prompt's last token first) and emits generated token t: at most max_new
  single-token steps, none wasted.
  """
  B, P = prompt_BP.shape
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
  left_BP, src_BP, valid_BP = _left_pad(prompt_BP, lens_B)
  if prefixes is None:
    cache, start_B = init_cache(model.cfg, B, P - 1 + max_new), jnp.zeros_like(lens_B)
  else:
    cache, start_B = _prefix_cache(apply, model.cfg, prefixes, B, P - 1 + max_new)
  if P > 1:
    _, _, cache = apply(left_BP[:, :-1], start_B[:, None] + src_BP[:, :-1], valid_BP[:, :-1],
                        cache=cache)

  def step(tok_B, t, cache):
    pos_B1 = (start_B + lens_B - 1 + t)[:, None]
    logits_B1V, _, cache = apply(tok_B[:, None], pos_B1, jnp.ones_like(pos_B1), cache=cache)
    return greedy(logits_B1V[:, 0]), cache

  return _run(step, left_BP[:, -1].astype(jnp.int32), cache, max_new, eos_id)


def _run(step, first_B, state, max_new: int, eos_id):
  """Greedy tokens [B, max_new] from `step(token_B, t, state) -> (next_B, state)`, t = 0, 1,
  ...; stops once every row has produced eos_id (the columns not reached hold eos_id)."""
  B = first_B.shape[0]

  def cond(carry):
    t, _, done_B, _, _ = carry
    return (t < max_new) & ~done_B.all()

  def body(carry):
    t, tok_B, done_B, out_BW, state = carry
    nxt_B, state = step(tok_B, t, state)
    return t + 1, nxt_B, done_B | (nxt_B == eos_id), out_BW.at[:, t].set(nxt_B), state

  init = (jnp.int32(0), first_B, jnp.zeros(B, bool), jnp.full((B, max_new), eos_id, jnp.int32),
          state)
  return jax.lax.while_loop(cond, body, init)[3]


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def generate_recompute(model: Transformer, params, prompt_BP, lens_B, max_new: int, eos_id=-1,
                       prefixes: Prefixes | None = None):
  """`generate`'s greedy tokens (same arguments, same early stop at eos_id) without a KV
  cache: step t re-runs every row's whole sequence so far, its prompt (left-padded as in
  `generate`) and the t tokens generated before, and projects only the last position onto the
  vocabulary (the final hidden state times `head_matrix`; the model's logits are compiled
  away). The steps are unrolled, each compiled for its own length P + t (no position beyond a
  row's sequence but the prompts' padding), each but the first under a `lax.cond` that skips
  it once every row has emitted eos_id. With `prefixes`, each step first re-runs the A
  distinct prefixes (A rows, not B) and the rows attend to their prefix's keys/values of that
  step: the whole sequence is recomputed every step, and no more than that; nothing is carried
  from one step to the next but the tokens."""
  B, P = prompt_BP.shape
  cfg = model.cfg
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
  head_DV = head_matrix(cfg, params)
  left_BP, src_BP, valid_BP = _left_pad(prompt_BP, lens_B)
  start_B = (jnp.zeros_like(lens_B) if prefixes is None
             else prefixes.lens_A[prefixes.of_B])
  pos_BP = start_B[:, None] + src_BP

  def step(t, out_BW):
    seq_BL = jnp.concatenate([left_BP, out_BW[:, :t]], 1).astype(jnp.int32)
    pos_BL = jnp.concatenate([pos_BP, (start_B + lens_B)[:, None] + jnp.arange(t)], 1)
    seg_BL = jnp.concatenate([valid_BP, jnp.ones((B, t), valid_BP.dtype)], 1)
    if prefixes is None:
      _, hidden_BLD, _ = apply(seq_BL, pos_BL, seg_BL)
    else:
      # The barrier ties this step's prefix run to this step's sequence: XLA may not merge the
      # steps' identical prefix runs into one (that would be a cache).
      tokens_AS, seq_BL = jax.lax.optimization_barrier((prefixes.tokens_AS, seq_BL))
      cache, _ = _prefix_cache(apply, cfg, prefixes._replace(tokens_AS=tokens_AS), B, P + t)
      _, hidden_BLD, _ = apply(seq_BL, pos_BL, seg_BL, cache=cache)
    logits_BV = jnp.dot(hidden_BLD[:, -1], head_DV, preferred_element_type=jnp.float32)
    nxt_B = greedy(logits_BV)
    return out_BW.at[:, t].set(nxt_B), nxt_B == eos_id

  if max_new == 0:
    return jnp.zeros((B, 0), jnp.int32)
  out_BW, done_B = step(0, jnp.full((B, max_new), eos_id, jnp.int32))
  for t in range(1, max_new):
    out_BW, hit_B = jax.lax.cond(done_B.all(), lambda o: (o, jnp.zeros(B, bool)),
                                 functools.partial(step, t), out_BW)
    done_B = done_B | hit_B
  return out_BW


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def generate_recompute_fixed_width(model: Transformer, params, prompt_BP, lens_B, max_new: int,
                                   eos_id=-1):
  """The older recompute baseline, kept for comparison (`bench eval`'s
  kv_cache_speedup_vs_fixed_width): whole prompts, every step re-runs the full padded width
  P + max_new and projects every position onto the vocabulary."""
  B, P = prompt_BP.shape
  seq_BT = jnp.concatenate([prompt_BP, jnp.zeros((B, max_new), prompt_BP.dtype)], 1)
  positions_BT = jnp.broadcast_to(jnp.arange(P + max_new), (B, P + max_new))

  def step(tok_B, t, seq_BT):
    del tok_B   # already in seq_BT
    seg_BT = (positions_BT < (lens_B + t)[:, None]).astype(jnp.int32)
    logits_BTV, _, _ = model.apply({"params": params}, seq_BT, positions_BT, seg_BT)
    nxt_B = greedy(logits_BTV[jnp.arange(B), lens_B + t - 1])
    return nxt_B, seq_BT.at[jnp.arange(B), lens_B + t].set(nxt_B)

  return _run(step, jnp.zeros(B, jnp.int32), seq_BT, max_new, eos_id)


@functools.partial(jax.jit, static_argnames=("fn", "model", "max_new"))
def over_runs(fn, model: Transformer, params_R, *args, max_new: int, **kw):
  """`fn(model, params, *args, max_new=max_new, **kw)` (generate, fill_masks) for each run's
  params, stacked on a leading run axis: [R, ...], vmapped over the runs. Each run's tokens
  are its own call's: `generate`'s loop then runs until every run has stopped, holding a
  stopped run's state as it is."""
  return jax.vmap(lambda p: fn(model, p, *args, max_new=max_new, **kw))(params_R)


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
  at_BW = jnp.minimum(lens_B[:, None] + jnp.arange(max_new), P + max_new - 1)
  return greedy(jnp.take_along_axis(logits_BTV, at_BW[..., None], 1))


def generation_flops(model_cfg, batches, max_new: int) -> dict[str, float]:
  """Matmul FLOPs (attention scores left out) of QA generation over `batches` (QASet each),
  max_new steps, by path:
  - `recompute` (`generate.generate_recompute`, the no-cache baseline): step t runs the A
    distinct prefixes and every row's rest + t generated tokens through the body, and the head
    on the last position only;
  - `fixed_width` (`generate.generate_recompute_fixed_width`): the whole padded question +
    max_new positions, head included, at every step;
  - `kv_cache` (`generate.generate`): each distinct prefix once and each row's rest but its
    last token without the head, then max_new one-token steps with it.
  A position whose outputs only fill caches (a prefix's; in `kv_cache` a rest's before its
  last token) counts `forward_flops`' `cache_fill`: its last layer's query, output projection
  and MLP feed nothing, and XLA leaves them out (their count made the cache's FLOP ratio
  ~11% too high at tiny: the compiled programs' dots match this count)."""
  parts = forward_flops(model_cfg)
  body, head, fill = parts["body"], parts["head"], parts["cache_fill"]
  out = dict(recompute=0.0, fixed_width=0.0, kv_cache=0.0)
  for qs in batches:
    rows, width = qs.rest_NR.shape
    whole = int(qs.prompt_lens_N.max())
    out["recompute"] += (max_new * qs.prefix_AS.size * fill
                         + sum(rows * (width + t) for t in range(max_new)) * body
                         + max_new * rows * head)
    out["fixed_width"] += max_new * rows * (whole + max_new) * (body + head)
    out["kv_cache"] += ((qs.prefix_AS.size + rows * (width - 1)) * fill
                        + max_new * rows * (body + head))
  return out
