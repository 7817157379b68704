"""The chunked output-head loss (`step.head_cross_entropy`) equals cross entropy on the full
logits, in value and in the gradients of the hidden states and the head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kstore_jax.model import transformer
from kstore_jax.train import step


def full_logits_loss(hidden_BLD, head_DV, targets_BL, weights_BL):
  return step.weighted_cross_entropy(jnp.einsum("bld,dv->blv", hidden_BLD, head_DV),
                                     targets_BL, weights_BL)


@pytest.mark.parametrize("b,l", [(4, 24), (3, 7), (600, 5), (1, 2048)])
def test_head_cross_entropy_equals_full_logits(b, l):
  d, v = 16, 50
  k = jax.random.split(jax.random.key(b * 1000 + l), 4)
  hidden = jax.random.normal(k[0], (b, l, d))
  head = jax.random.normal(k[1], (d, v))
  targets = jax.random.randint(k[2], (b, l), 0, v)
  weights = (jax.random.uniform(k[3], (b, l)) < 0.7).astype(jnp.float32)
  grad = lambda f: jax.value_and_grad(lambda h, w: f(h, w, targets, weights)[0], (0, 1))
  (ref, ref_grads), (got, got_grads) = grad(full_logits_loss)(hidden, head), grad(
      step.head_cross_entropy)(hidden, head)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for g, r in zip(got_grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  assert step.head_cross_entropy(hidden, head, targets, weights)[1] == weights.sum()


def test_lm_loss_uses_the_models_head():
  """make_lm_loss (hidden states through `head_matrix`) gives the loss of the model's own
  logits, for a tied and an untied head."""
  for tie in (True, False):
    cfg = transformer.ModelConfig(vocab_size=40, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                                  tie_embeddings=tie)
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 40)
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                          model.init(jax.random.key(1), tokens)["params"],
                          is_leaf=lambda x: hasattr(x, "value"))
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1),
             "weights": jnp.ones((2, 9)).at[:, -1].set(0.0),
             "positions": jnp.broadcast_to(jnp.arange(9), (2, 9)),
             "segment_ids": jnp.ones((2, 9), jnp.int32)}
    logits, _, _ = model.apply({"params": params}, tokens)
    ref = step.weighted_cross_entropy(logits, batch["targets"], batch["weights"])[0]
    got = step.make_lm_loss(model)(params, {}, batch)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
