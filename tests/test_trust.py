"""Tests that would catch a wrong model (issue 22, items 9-11): bio recall separates a model that
stored its people's bios from an untrained one; a bfloat16 run trains like float32 and
evaluates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from kstore_jax.data import pipeline, tokenizer as tokenizer_lib, world as world_lib
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.eval import qa_eval
from kstore_jax.experiment import model_vocab
from kstore_jax.model.transformer import ModelConfig, Transformer
from kstore_jax.train import optim, step as step_lib

N_PEOPLE = 16                # bios of the first half are trained on, the rest never seen
STORED = np.arange(N_PEOPLE // 2)
STORE_STEPS = 200


@pytest.fixture(scope="module")
def world():
  cfg = base.get_config("tiny")          # one bio per person (multi=1), fixed sentence order
  cfg.data.n_people = N_PEOPLE
  return world_lib.build_world(cfg, tokenizer_lib.train_tokenizer(1024))


def tiny_model(world):
  mc = ModelConfig(vocab_size=model_vocab(world.renderer), num_layers=2, num_heads=4,
                   d_model=64, d_ff=256, rotary_fraction=0.5)
  model = Transformer(mc)
  init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))))
  return model, init(jax.random.PRNGKey(0))["params"]


@pytest.fixture(scope="module")
def stored(world):
  """(model, random-init params, params after STORE_STEPS full-batch steps of the project's own
  train step and optimizer on the bios of the STORED people only)."""
  model, init_params = tiny_model(world)
  bios = world.bios(STORED)
  assert len(bios) == len(STORED)                   # multi=1: each person's bio copy 0
  docs = bios.docs(np.arange(len(bios)))
  batch = {k: jnp.asarray(v) for k, v in
           pipeline.pack_docs(docs, int(docs.lengths.max()), world.pad_id).items()}
  stage = base.stage(STORE_STEPS, len(batch["inputs"]), 3e-3, 20, 0.0)
  optimizer = optim.make_optimizer(stage)
  train_step = jax.jit(step_lib.make_train_step(step_lib.make_lm_loss(model), optimizer,
                                                optim.schedule(stage)))
  state = {"step": jnp.int32(0), "params": init_params,
           "opt_state": optimizer.init(init_params)}
  losses = []
  for _ in range(STORE_STEPS):
    state, metrics = train_step(state, None, batch)
    losses.append(metrics["loss"])
  assert float(losses[-1]) < 0.1 * float(losses[0]), (losses[0], losses[-1])
  return model, init_params, state["params"]


def test_bio_recall_separates_stored_from_random(world, stored):
  """Bio recall (exact match of each of the six values inside the person's first bio, teacher
  forced) is >= 0.9 on every attribute for the people whose bios the model was trained on
  until its loss was low, and about 0 for people it never saw (same model: recall reads this
  person's stored values, not fluency) and for everyone at random init (a value is a few tokens
  out of a ~1,000-token vocabulary)."""
  model, init_params, params = stored
  unseen = np.setdiff1d(np.arange(N_PEOPLE), STORED)
  got = qa_eval.bio_recall(model, params, world, STORED, batch_size=3)
  assert set(got) == set(ATTRIBUTES) | {"mean"}
  assert all(got[a] >= 0.9 for a in ATTRIBUTES), got
  assert got["mean"] >= 0.95, got
  never = qa_eval.bio_recall(model, params, world, unseen, batch_size=3)
  assert never["mean"] <= 0.1, never
  untrained = qa_eval.bio_recall(model, init_params, world, np.arange(N_PEOPLE), batch_size=3)
  assert untrained["mean"] <= 0.1 and all(untrained[a] <= 0.25 for a in ATTRIBUTES), untrained
