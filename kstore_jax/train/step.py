"""Losses and the generic jitted train step (pure functions over pytrees).

A stage trains `params` (all model weights, LoRA factors, or probe heads) against `frozen`
(nothing, or the base model) with a `loss_fn(params, frozen, batch) -> (loss, aux)`.
"""

import jax
import jax.numpy as jnp
import optax


def weighted_cross_entropy(logits_BLV, targets_BL, weights_BL):
  """Mean next-token cross entropy over positions with weight > 0; and the weight sum."""
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  total = weights_BL.sum()
  return (ce_BL * weights_BL).sum() / jnp.maximum(total, 1.0), total


def make_lm_loss(model, merge=None):
  """LM loss of `model`; `merge(frozen, params)` builds effective params (LoRA), else params."""

  def loss_fn(params, frozen, batch):
    effective = params if merge is None else merge(frozen, params)
    logits_BLV, _, _ = model.apply({"params": effective}, batch["inputs"], batch["positions"],
                                   batch["segment_ids"])
    loss, tokens = weighted_cross_entropy(logits_BLV, batch["targets"], batch["weights"])
    return loss, {"loss_tokens": tokens}

  return loss_fn


def make_train_step(loss_fn, optimizer, schedule):
  """state = {'step', 'params', 'opt_state'} -> (new state, metrics)."""

  def train_step(state, frozen, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], frozen, batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # param_norm is of the *updated* params: the NaN guard then also covers the state a
    # checkpoint would save, not only the loss of the weights before the update.
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "lr": schedule(state["step"]), **aux}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step
