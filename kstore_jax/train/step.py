"""Losses and the generic jitted train step (pure functions over pytrees).

A stage trains `params` (all model weights, LoRA factors, or probe heads) against `frozen`
(nothing, or the base model) with a `loss_fn(params, frozen, batch) -> (loss, aux)`.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from kstore_jax.data.batches import INPUTS, POSITIONS, SEGMENT_IDS, TARGETS, WEIGHTS
from kstore_jax.model import transformer
from kstore_jax.train import optim

CHUNK_ROWS = 1024   # CPU: token rows per vocabulary chunk, [1024, V] f32 logits stay in cache
# GPU/TPU: chunks of at most 256 MiB of f32 logits (paper config: 4 chunks instead of 64); each
# chunk is a loop iteration of small kernels, and the matmuls are larger (not measured yet)
ACCELERATOR_CHUNK_BYTES = 1 << 28
# jax name scopes of the step's parts outside the model (the ops' metadata; `bench profile`
# sums its time by them)
HEAD_LOSS, OPTIMIZER, METRICS = "head_loss", "optimizer", "metrics"
SCOPES = (HEAD_LOSS, OPTIMIZER, METRICS)
# The aux key of an LM loss's weight: the target positions its mean is over (microbatches are
# combined by it: `accumulated_value_and_grad`)
LOSS_WEIGHT = "loss_tokens"


def _max_and_sum_exp(logits_LV):
  """(max, sum of exp(logits - max)) of each row in one pass: a variadic reduction carrying
  both (the running sum rescaled when the max grows), so the [L, V] logits are read once for
  the two, not twice. Its start value is the most negative finite float, not -inf (two starts
  combined would make exp(-inf + inf))."""
  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    return m, s1 * jnp.exp(m1 - m) + s2 * jnp.exp(m2 - m)

  start = (jnp.float32(jnp.finfo(jnp.float32).min), jnp.float32(0.0))
  return jax.lax.reduce((logits_LV, jnp.ones_like(logits_LV)), start, combine, (1,))


def _head_chunks(hidden_GLD, head_DV, targets_GL, weights_GL, one_pass: bool = False):
  """Weighted CE sum of the output head over chunks [G, L] of positions, with its gradients
  (d hidden, d head) computed in the same pass: each chunk's logits are made, soft-maxed and
  turned into gradients while they are in cache, never written out whole. Every product is a
  2-D matmul; the head's gradient contracts the chunk's rows in place (dot_general on dim 0 of
  both: XLA:CPU runs `h.T @ g` through a transposed copy at ~2/3 the speed). `one_pass`: the
  softmax's max and sum in one reduction (`_max_and_sum_exp`; on a GPU, where a chunk's
  logits are in memory, not in cache: one read of them less)."""
  def chunk(dhead_DV, xs):
    h_LD, t_L, w_L = xs
    logits_LV = jnp.dot(h_LD, head_DV, preferred_element_type=jnp.float32)
    if one_pass:
      top_L, sum_L = _max_and_sum_exp(logits_LV)
      top_L1 = top_L[:, None]
    else:
      top_L1 = logits_LV.max(-1, keepdims=True)
    e_LV = jnp.exp(logits_LV - top_L1)
    sum_L1 = sum_L[:, None] if one_pass else e_LV.sum(-1, keepdims=True)
    hit_LV = jax.lax.broadcasted_iota(jnp.int32, logits_LV.shape, 1) == t_L[:, None]
    target_L = jnp.where(hit_LV, logits_LV, 0.0).sum(-1)
    ce = ((top_L1[:, 0] + jnp.log(sum_L1[:, 0]) - target_L) * w_L).sum()
    dlogits_LV = ((e_LV / sum_L1 - hit_LV) * w_L[:, None]).astype(h_LD.dtype)
    dh_LD = jnp.dot(dlogits_LV, head_DV.T, preferred_element_type=jnp.float32)
    dhead_DV = dhead_DV + jax.lax.dot_general(h_LD, dlogits_LV, (((0,), (0,)), ((), ())),
                                              preferred_element_type=jnp.float32)
    return dhead_DV, (ce, dh_LD.astype(h_LD.dtype))

  dhead_DV, (ce_G, dh_GLD) = jax.lax.scan(
      chunk, jnp.zeros(head_DV.shape, jnp.float32), (hidden_GLD, targets_GL, weights_GL))
  return ce_G.sum(), dh_GLD, dhead_DV.astype(head_DV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce_sum(hidden_GLD, head_DV, targets_GL, weights_GL, one_pass):
  return _head_chunks(hidden_GLD, head_DV, targets_GL, weights_GL, one_pass)[0]


def _chunked_ce_fwd(hidden_GLD, head_DV, targets_GL, weights_GL, one_pass):
  ce, dh_GLD, dhead_DV = _head_chunks(hidden_GLD, head_DV, targets_GL, weights_GL, one_pass)
  return ce, (dh_GLD, dhead_DV)


def _chunked_ce_bwd(one_pass, grads, g):
  del one_pass
  dh_GLD, dhead_DV = grads
  return g * dh_GLD, g * dhead_DV, None, None


_chunked_ce_sum.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def chunk_rows(platform: str, vocab: int) -> int:
  """Token rows per chunk of `head_cross_entropy` on `platform` for a `vocab`-wide head."""
  if platform == "cpu":
    return CHUNK_ROWS
  return max(CHUNK_ROWS, ACCELERATOR_CHUNK_BYTES // (4 * vocab))


def positions_per_chunk(b: int, l: int, rows: int) -> int:
  """k: `head_cross_entropy`'s chunks are positions [c k, (c + 1) k) of all b rows, the
  largest divisor of l with b k <= rows (at least 1)."""
  k = max(1, min(l, rows // b))
  while l % k:
    k -= 1
  return k


def head_cross_entropy(hidden_BLD, head_DV, targets_BL, weights_BL, rows: int = CHUNK_ROWS,
                       one_pass: bool = False):
  """Mean next-token cross entropy of the logits `hidden_BLD @ head_DV` over positions with
  weight > 0, and the weight sum; without ever making the [B, L, V] logits: the
  positions go through the head in chunks of ~`rows` (whole batch rows times a slice of
  positions, so a batch sharded over rows stays sharded), each chunk's gradients made while
  its logits are in cache. Same value and gradients up to float summation order; at the tiny
  CPU size the head's share of a train step falls by a third (BENCHMARKS.md). `one_pass`:
  each row's softmax max and sum in one reduction (off the CPU: `_head_chunks`)."""
  b, l, d = hidden_BLD.shape
  k = positions_per_chunk(b, l, rows)
  # [B, L, ...] -> [L/k, B*k, ...]: chunk c = positions [c*k, (c+1)*k) of every row
  split = lambda x: jnp.moveaxis(x.reshape(b, l // k, k, *x.shape[2:]), 1, 0).reshape(
      l // k, b * k, *x.shape[2:])
  ce = _chunked_ce_sum(split(hidden_BLD), head_DV, split(targets_BL),
                       split(weights_BL.astype(jnp.float32)), one_pass)
  total = weights_BL.sum()
  return ce / jnp.maximum(total, 1.0), total


@functools.lru_cache(maxsize=16)
def make_lm_loss(model, merge=None):
  """LM loss of `model` on an LM batch (data/batches.py); `merge(frozen, params)` builds
  effective params (LoRA), else params.
  The output head runs inside the loss (`head_cross_entropy`); the model's own logits are
  unused and compiled away. One function per (equal) model and merge in a process, so the
  stages and runs that train the same model share one jitted step (loop.compile_step)."""

  def loss_fn(params, frozen, batch):
    effective = params if merge is None else merge(frozen, params)
    _, hidden_BLD, _ = model.apply({"params": effective}, batch[INPUTS], batch[POSITIONS],
                                   batch[SEGMENT_IDS])
    head_DV = transformer.head_matrix(model.cfg, effective)
    with jax.named_scope(HEAD_LOSS):
      loss, tokens = head_cross_entropy(hidden_BLD, head_DV, batch[TARGETS], batch[WEIGHTS],
                                        chunk_rows(model.cfg.platform, head_DV.shape[-1]),
                                        one_pass=model.cfg.platform != "cpu")
    return loss, {LOSS_WEIGHT: tokens}

  return loss_fn


def accumulated_value_and_grad(loss_fn, microbatches: int):
  """`jax.value_and_grad(loss_fn, has_aux=True)` of a batch computed over `microbatches`
  row sets one after another (a scan: the activations of one microbatch live at a time). Row i
  is in microbatch i % microbatches, so with rows split over the data-parallel devices each
  microbatch spans them all. Each microbatch's mean loss, gradient and aux means count by its
  aux[LOSS_WEIGHT]: the batch's own mean loss and gradient up to float summation order, aux
  the weight's sum and the other entries' weighted means."""
  def weighted(params, frozen, batch):
    loss, aux = loss_fn(params, frozen, batch)
    w = aux[LOSS_WEIGHT]
    return loss * w, {k: v if k == LOSS_WEIGHT else v * w for k, v in aux.items()}

  grad_fn = jax.value_and_grad(weighted, has_aux=True)

  def value_and_grad(params, frozen, batch):
    split = lambda x: jnp.moveaxis(   # [B, ...] -> [M, B/M, ...], microbatch m = rows m::M
        x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 1, 0)
    parts = jax.tree.map(split, batch)

    def add(total, part):
      return jax.tree.map(jnp.add, total, grad_fn(params, frozen, part)), None

    first = jax.tree.map(lambda x: x[0], parts)
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                        jax.eval_shape(grad_fn, params, frozen, first))
    ((loss, aux), grads), _ = jax.lax.scan(add, zero, parts)
    total = aux[LOSS_WEIGHT]
    mean = lambda x: x / jnp.maximum(total, 1.0).astype(x.dtype)
    aux = {k: v if k == LOSS_WEIGHT else mean(v) for k, v in aux.items()}
    return (mean(loss), aux), jax.tree.map(mean, grads)

  return value_and_grad


def make_train_step(loss_fn, microbatches: int = 1, norm_apart: bool = False,
                    one_pass_norms: bool = False):
  """(state = {'step', 'params', 'opt_state'}, frozen, batch, hparams) -> (new state,
  metrics): one AdamW step of `loss_fn(params, frozen, batch)` with the stage's optimizer
  numbers `hparams` (optim.hyperparams) as arguments, not constants of the program; its
  gradient over `microbatches` parts of the batch (`accumulated_value_and_grad`) when > 1.
  `norm_apart`: param_norm reads the updated params after the update, not inside its
  fusions (a grid cohort's step: BENCHMARKS.md "The step's floor"). `one_pass_norms` (off
  the CPU): the gradient's norm (the clip's, grad_norm) and param_norm each one reduction
  over the leaves, not one a leaf (optim.global_norm)."""
  grad_fn = (jax.value_and_grad(loss_fn, has_aux=True) if microbatches == 1
             else accumulated_value_and_grad(loss_fn, microbatches))

  def train_step(state, frozen, batch, hparams):
    optimizer = optim.make_optimizer(hparams, one_pass_norms)
    (loss, aux), grads = grad_fn(state["params"], frozen, batch)
    with jax.named_scope(OPTIMIZER):
      updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    # param_norm is of the *updated* params: the NaN guard then also covers the state a
    # checkpoint would save, not only the loss of the weights before the update.
    with jax.named_scope(METRICS):
      metrics = {"loss": loss, "grad_norm": optim.global_norm(grads, one_pass_norms),
                 "param_norm": optim.global_norm(jax.lax.optimization_barrier(params)
                                                 if norm_apart else params, one_pass_norms),
                 "lr": optim.learning_rate(hparams, state["step"]), **aux}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step
