"""AdamW with warmup + cosine schedule and global-norm clipping, from a stage config.

The optimizer's numbers (`hyperparams`) are arguments of the train step, not constants of its
program: stages and runs that differ only in them (pretrain -> finetune at the same shape; runs
of other lengths or learning rates) trace to the same program, so the persistent compilation
cache serves one compiled step to all of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

HYPERPARAMS = ("lr", "warmup_steps", "decay_steps", "final_lr_fraction", "b1", "b2", "eps",
               "weight_decay", "grad_clip")


def hyperparams(stage_cfg) -> dict[str, np.ndarray]:
  """A stage's optimizer numbers as float32 scalars (HYPERPARAMS): peak `lr` after
  `warmup_steps`, then a cosine over `decay_steps` down to `lr * final_lr_fraction` at
  `steps`; Adam's b1, b2, eps; decoupled weight decay; the global-norm clip."""
  w = stage_cfg.warmup_steps
  values = dict(lr=stage_cfg.lr, warmup_steps=w, decay_steps=max(stage_cfg.steps, w + 1) - w,
                final_lr_fraction=stage_cfg.final_lr_fraction, b1=stage_cfg.b1,
                b2=stage_cfg.b2, eps=stage_cfg.eps, weight_decay=stage_cfg.weight_decay,
                grad_clip=stage_cfg.grad_clip)
  return {k: np.float32(values[k]) for k in HYPERPARAMS}


def learning_rate(hp, count):
  """The learning rate at step `count`: linear from 0 to `lr` over the warmup, then a half
  cosine from `lr` to `lr * final_lr_fraction` over `decay_steps`, constant after (optax's
  warmup_cosine_decay_schedule; without warmup its cosine_decay_schedule)."""
  count = jnp.asarray(count, jnp.float32)
  peak, warmup, decay = hp["lr"], hp["warmup_steps"], hp["decay_steps"]
  warm = -peak * (1 - count / jnp.maximum(warmup, 1)) + peak
  t = jnp.clip(count - warmup, 0, decay)
  alpha = hp["final_lr_fraction"]
  cosine = peak * ((1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * t / decay)) + alpha)
  return jnp.where(count < warmup, warm, cosine)


def _keys(path) -> tuple:
  """A param's path as its dict keys and list indices (a boxed leaf's `.value` left out)."""
  return tuple(k.key if isinstance(k, jax.tree_util.DictKey) else k.idx for k in path
               if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)))


def decay_mask(params):
  """Weight decay on kernels, embeddings and low-rank factors; none on biases and norm
  scales. Told by name, not rank: GPT-2's query/key/value biases are [H, K] and a probe's
  linear head bias [J, C]. A bias is a leaf named `bias`, or `b` beside a `w` (the probes'
  linear head; LoRA's `b` beside an `a` is a factor); a norm's is `scale`."""
  linear = {_keys(p)[:-1] for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if _keys(p)[-1] == "w"}

  def decays(path, _):
    *parent, name = _keys(path)
    return not (name in ("bias", "scale") or (name == "b" and tuple(parent) in linear))

  return jax.tree_util.tree_map_with_path(decays, params)


GROUP = 32   # leaves a one-pass norm's reduction reads (a fusion's operands are bounded)


def global_norm(tree, one_pass: bool = False) -> jax.Array:
  """The l2 norm of every leaf of `tree` together (optax.tree.norm). `one_pass` (off the
  CPU): the leaves, raveled, go `GROUP` at a time into one reduction of their concatenation,
  which XLA fuses into one kernel, not one reduction kernel a leaf: a GPU step's ~100-150
  parameter leaves made half its kernels, the gradient's and the params' norms (BENCHMARKS.md
  "Fewer kernels"). The same sum in another order."""
  if not one_pass:
    return optax.tree.norm(tree)
  leaves = [x.ravel().astype(jnp.float32) for x in jax.tree.leaves(tree)]
  parts = [jnp.concatenate(leaves[i:i + GROUP]) for i in range(0, len(leaves), GROUP)]
  return jnp.sqrt(sum(jnp.sum(p * p) for p in parts))


def clip_by_global_norm(max_norm, one_pass: bool = False) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (the same empty state, the same updates) with its norm from
  `global_norm(updates, one_pass)`."""
  def update(updates, state, params=None):
    del params
    g_norm = global_norm(updates, one_pass)
    trigger = g_norm < max_norm
    return jax.tree.map(
        lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm),
        updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(hp, one_pass: bool = False) -> optax.GradientTransformation:
  """The optimizer of hyperparameters `hp` (`hyperparams`: concrete, or traced inside the
  train step); its state's structure does not depend on their values nor on `one_pass`
  (the clip's norm: global_norm)."""
  return optax.chain(
      clip_by_global_norm(hp["grad_clip"], one_pass),
      optax.adamw(lambda count: learning_rate(hp, count), b1=hp["b1"], b2=hp["b2"],
                  eps=hp["eps"], weight_decay=hp["weight_decay"], mask=decay_mask))
