"""AdamW with warmup + cosine schedule and global-norm clipping, from a stage config."""

import jax
import optax


def schedule(stage_cfg) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * final_lr_fraction` at `steps`."""
  end = stage_cfg.lr * stage_cfg.final_lr_fraction
  if not stage_cfg.warmup_steps:
    return optax.cosine_decay_schedule(stage_cfg.lr, max(stage_cfg.steps, 1),
                                       alpha=stage_cfg.final_lr_fraction)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=stage_cfg.lr, warmup_steps=stage_cfg.warmup_steps,
      decay_steps=max(stage_cfg.steps, stage_cfg.warmup_steps + 1), end_value=end)


def decay_mask(params):
  """Weight decay on matrices only (not on norms, biases)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(stage_cfg) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(stage_cfg.grad_clip),
      optax.adamw(schedule(stage_cfg), b1=stage_cfg.b1, b2=stage_cfg.b2, eps=stage_cfg.eps,
                  weight_decay=stage_cfg.weight_decay, mask=decay_mask))
