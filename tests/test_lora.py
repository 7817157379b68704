"""LoRA as a pure transform: zero B = base model; training moves only the LoRA tree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as configs_base
from kstore_jax.model import lora
from kstore_jax.model.transformer import ModelConfig, Transformer
from kstore_jax.train import optim, step as step_lib

RANK, EMBED_RANK = 4, 8


@pytest.fixture(scope="module")
def setup():
  model = Transformer(ModelConfig(vocab_size=256, num_layers=2, num_heads=4, d_model=64,
                                  d_ff=128))
  init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))))
  base = init(jax.random.PRNGKey(0))["params"]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (4, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((4, 16), np.float32), "segment_ids": np.ones((4, 16), np.int32),
           "positions": np.broadcast_to(np.arange(16), (4, 16)).astype(np.int32)}
  batch = jax.tree.map(jnp.asarray, batch)
  apply = jax.jit(lambda p: model.apply({"params": p}, batch["inputs"])[0])
  return model, base, batch, apply


def paths(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def trained(setup):
  """embed_rank -> (lora before, lora after one adam step of the stage's train step); and
  'base' -> a copy of the base params taken before any step."""
  model, base, batch, _ = setup
  out = {"base": paths(jax.tree.map(np.array, base))}
  for embed_rank in (EMBED_RANK, 0):
    params = lora.init(jax.random.PRNGKey(1), base, RANK, embed_rank)
    hp = optim.hyperparams(configs_base.stage(1, 1, 1e-2, 0, 0.0))   # AdamW at 1e-2
    opt = optim.make_optimizer(hp)
    step = jax.jit(step_lib.make_train_step(step_lib.make_lm_loss(model, lora.merge)))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}
    new_state, metrics = step(state, base, batch, hp)
    assert np.isfinite(float(metrics["loss"]))
    out[embed_rank] = params, new_state["params"]
  return out


def test_zero_b_equals_base(setup):
  _, base, _, apply = setup
  params = lora.init(jax.random.PRNGKey(1), base, RANK, EMBED_RANK)
  assert all(np.all(v == 0) for k, v in paths(params).items() if k.endswith("['b']"))
  np.testing.assert_array_equal(apply(lora.merge(base, params)), apply(base))


def test_one_step_moves_only_lora(setup, trained):
  _, base, _, apply = setup
  before, after = trained[EMBED_RANK]
  for k, v in paths(base).items():                      # the frozen base is untouched
    np.testing.assert_array_equal(v, trained["base"][k])
  b_before, b_after = paths(before), paths(after)
  assert b_before.keys() == b_after.keys()
  moved = {k for k in b_after if not np.array_equal(b_after[k], b_before[k])}
  assert {k for k in b_after if k.endswith("['b']")} <= moved   # every B factor moved
  assert not np.allclose(apply(lora.merge(base, after)), apply(base))


def test_merge_touches_only_targets(setup, trained):
  _, base, _, _ = setup
  for embed_rank in (EMBED_RANK, 0):
    _, after = trained[embed_rank]
    merged, orig = paths(lora.merge(base, after)), paths(base)
    assert merged.keys() == orig.keys()
    changed = {k for k in orig if not np.array_equal(merged[k], orig[k])}
    want = {f"['block{i}']['attn']['{t}']['kernel']" for i in range(2)
            for t in ("query", "value")}
    if embed_rank:
      want.add("['embed']['embedding']")
    assert changed == want


def test_gradient_reaches_b(setup):
  model, base, batch, _ = setup
  params = lora.init(jax.random.PRNGKey(1), base, RANK, EMBED_RANK)
  loss_fn = step_lib.make_lm_loss(model, lora.merge)
  g = paths(jax.jit(jax.grad(lambda p: loss_fn(p, base, batch)[0]))(params))
  b = {k: v for k, v in g.items() if k.endswith("['b']")}
  assert len(b) == 2 * 2 + 1                                  # q, v per block + embedding
  assert all(np.abs(v).sum() > 0 for v in b.values()), {k: np.abs(v).sum() for k, v in b.items()}
