"""In-process unit tests of train/ on toy trees (no model, no subprocess): one train step against
an AdamW update computed by hand, the warmup/cosine schedule at a few steps, and a Checkpointer
round trip (state + Grain iterator state) with `damage` spotting a file cut short. The
end-to-end runs through `python -m kstore_jax.main` are in test_train.py / test_checkpoint.py."""

import math
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from kstore_jax.train import checkpoint, loop, optim, sharding, step as step_lib


def stage_cfg(warmup_steps: int):
  """A stage config: 10 steps, lr 0.1 (to 0.01 at the end), decay 0.1, clip 1 (base.stage's
  b1 0.9, b2 0.98, eps 1e-6)."""
  return base.stage(steps=10, batch_size=1, lr=0.1, warmup_steps=warmup_steps,
                    weight_decay=0.1)


def test_schedule_warmup_then_cosine():
  """Linear from 0 to lr over the warmup, then a half cosine down to lr * final_lr_fraction at
  `steps`; without warmup the cosine starts at step 0."""
  lr, end, w, steps = 0.1, 0.01, 2, 10
  cosine = lambda s, start: end + (lr - end) * 0.5 * (1 + math.cos(math.pi * (s - start)
                                                                   / (steps - start)))
  warm = lambda s: optim.learning_rate(optim.hyperparams(stage_cfg(w)), s)
  for s, want in ((0, 0.0), (1, 0.05), (2, lr), (4, cosine(4, w)), (6, 0.055), (10, end)):
    assert abs(float(warm(s)) - want) < 1e-7, s
  cold = lambda s: optim.learning_rate(optim.hyperparams(stage_cfg(0)), s)
  for s, want in ((0, lr), (5, 0.055), (10, end)):
    assert abs(float(cold(s)) - cosine(s, 0)) < 1e-7 and abs(float(cold(s)) - want) < 1e-7, s


def test_train_step_is_one_adamw_update():
  """make_train_step: the gradient clipped to global norm 1, Adam's first (bias-corrected)
  step g / (|g| + eps), weight decay on matrices only, times lr(0); metrics of the step."""
  sc = stage_cfg(0)
  w0 = np.array([[1.0, -2.0], [0.5, 3.0]])
  b0 = np.array([0.25, -0.75])
  t = np.array([[0.0, 1.0], [2.0, -1.0]])

  def loss_fn(params, frozen, batch):   # frozen: a scale the loss reads but does not train
    loss = frozen * 0.5 * jnp.sum((params["w"] - batch["t"]) ** 2) + jnp.sum(
        params["b"] * batch["t"][0])
    return loss, {"aux": loss * 2}

  hp = optim.hyperparams(sc)
  opt = optim.make_optimizer(hp)
  params = {"w": jnp.asarray(w0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)}
  state = {"step": jnp.int32(0), "params": params, "opt_state": opt.init(params)}
  train_step = jax.jit(step_lib.make_train_step(loss_fn))
  new, metrics = train_step(state, jnp.float32(1.0), {"t": jnp.asarray(t, jnp.float32)}, hp)

  g = {"w": w0 - t, "b": t[0]}                         # the loss's gradient
  norm = math.sqrt(sum((v ** 2).sum() for v in g.values()))
  clipped = {k: v * min(1.0, sc.grad_clip / norm) for k, v in g.items()}
  decay = {"w": sc.weight_decay, "b": 0.0}             # matrices only
  p0 = {"w": w0, "b": b0}
  want = {k: p0[k] - sc.lr * (clipped[k] / (np.abs(clipped[k]) + sc.eps) + decay[k] * p0[k])
          for k in p0}
  assert norm > sc.grad_clip                           # the clip is exercised
  for k in want:
    np.testing.assert_allclose(np.asarray(new["params"][k]), want[k], rtol=1e-5, atol=1e-6)
  assert int(new["step"]) == 1
  loss = 0.5 * ((w0 - t) ** 2).sum() + (b0 * t[0]).sum()
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["aux"]), 2 * loss, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-6)   # before the clip
  np.testing.assert_allclose(float(metrics["param_norm"]),
                             math.sqrt(sum((v ** 2).sum() for v in want.values())), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["lr"]), sc.lr, rtol=1e-6)


def test_stages_differing_in_hyperparameters_share_one_program():
  """The optimizer's numbers are arguments of the compiled step (optim.hyperparams), so two
  stages of the same shapes that differ in steps, warmup, lr, decay, betas and clip lower to
  the same program (one executable from the persistent compilation cache for pretrain ->
  finetune, or runs of other lengths) and, in one process, share one jitted function; each
  still steps with its own schedule."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})

  def loss_fn(params, frozen, batch):
    return 0.5 * jnp.sum((params["w"] - batch["t"]) ** 2), {}

  def spec(sc):
    return loop.StageSpec(
        name="toy", stage_cfg=sc, loss_fn=loss_fn,
        init_params=lambda rng, args: {"w": jax.random.normal(rng, (2, 3))}, frozen=None,
        data=None, positions_per_step=1, flops_per_position=1.0, export=None)

  cfgs = [stage_cfg(2), base.stage(steps=37, batch_size=1, lr=3e-3, warmup_steps=0,
                                    weight_decay=0.0)]
  cfgs[1].update(b1=0.8, b2=0.95, final_lr_fraction=0.5, grad_clip=0.5)
  batch = {"t": jax.device_put(jnp.ones((2, 3), jnp.float32), sharding.batch_sharding(mesh))}
  texts, lrs, jitted = [], [], []
  for sc in cfgs:
    init, rng, abstract, _, train_step = loop.compile_stage(spec(sc), mesh, 0)
    texts.append(train_step.lower(abstract, None, batch).as_text())
    jitted.append(train_step.jitted)
    state = init(rng, None)
    for _ in range(3):
      state, metrics = train_step(state, None, batch)
    lrs.append(float(metrics["lr"]))   # lr at step 2
  assert texts[0] == texts[1]
  assert jitted[0] is jitted[1]   # the second stage neither traces nor compiles again
  hp = [optim.hyperparams(sc) for sc in cfgs]
  assert lrs[0] == np.float32(0.1)                     # end of stage_cfg(2)'s warmup
  np.testing.assert_allclose(lrs[1], float(optim.learning_rate(hp[1], 2)), rtol=1e-6)
  np.testing.assert_allclose(lrs[1], 3e-3 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 2 / 37))),
                             rtol=1e-6)


def batches():
  return iter(grain.MapDataset.range(20).batch(2).to_iter_dataset())


def test_checkpointer_round_trip_and_damage(tmp_path):
  """A saved step restores the same tree and the Grain iterator where it stood; once its
  manifest is written, `damage` names a state file cut short (None before)."""
  tree = {"step": jnp.int32(3), "params": {"w": jnp.arange(12.0).reshape(3, 4),
                                           "b": jnp.ones(4, jnp.bfloat16)}}
  it = batches()
  next(it), next(it)
  c = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  c.save(3, tree, it)
  c.close()   # commits the step and writes its manifest

  it2 = batches()
  c = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          tree)
  step, got = c.restore_latest(abstract, it2)
  assert step == 3 and c.damage(3) is None
  assert jax.tree.structure(got) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(next(it2), next(it))   # the iterator resumes at batch 3
  c.close()

  step_dir = tmp_path / "checkpoints" / "3"
  victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:-1])
  c = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  why = c.damage(3)
  c.close()
  assert why is not None and str(pathlib.Path(victim).relative_to(step_dir)) in why, why
