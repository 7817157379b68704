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


@pytest.mark.skipif(bool(__import__("kstore_jax.model.cpu_attention", fromlist=["x"])
                         .unavailable()), reason="cpu_docs cannot be built here")
def test_lora_step_flops_are_what_the_compiled_step_multiplies(tmp_path):
  """The finetune step's counted FLOPs (metrics' flops_per_s and mfu) against the dots of its
  compiled program (train/roofline.py reads them; cpu_docs' attention is a custom call, so the
  attention term is left out of both): autodiff forms each merged kernel's dense gradient and
  the tied head's, and each step merges and differentiates the factors. Counted as a frozen
  base's 4N, this step's FLOPs were 38% short (18.5% at tiny's size, 7.6% at paper's)."""
  from kstore_jax import experiment
  from kstore_jax.data import tokenizer
  from kstore_jax.model.transformer import flops_per_token
  from kstore_jax.train import loop, roofline
  cfg = configs_base.get_config("tiny,lora")
  cfg.data.n_people = 60
  cfg.model.update(num_layers=2, d_model=32, num_heads=2, d_ff=64, attention="cpu_docs")
  cfg.finetune.batch_size = 8
  exp = experiment.Experiment(cfg, tokenizer.of_config(cfg), experiment.Workdir(str(tmp_path)))
  spec = exp.member("finetune", "x", abstract=True)[0].spec
  text = loop.traced_step(spec, exp.mesh, cfg.seed).lower().compile().as_text()
  dots = sum(k.runs * k.flops for k in roofline.kernels(text))
  L = cfg.data.seq_len
  attention = flops_per_token(exp.model_cfg, L, "inputs") - flops_per_token(exp.model_cfg, 0,
                                                                             "inputs")
  counted = (spec.flops_per_position - attention) * spec.positions_per_step
  assert counted == dots, (counted, dots)
