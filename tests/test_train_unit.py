"""In-process unit tests of train/ on toy trees (no subprocess): one train step against an AdamW
update computed by hand, the warmup/cosine schedule at a few steps, which params weight decay
reaches (a tiny model's, a probe's, LoRA's, listed by hand), the loop on a toy quadratic stage
(the NaN guard before every save, the eval row before its step's save, a grid catch-up's last
step logged), and a Checkpointer round trip (state + Grain iterator state) with `damage`
spotting a file cut short. The end-to-end runs through `python -m kstore_jax.main` are in
test_train.py / test_checkpoint.py."""

import math
import os
import pathlib
import signal
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from kstore_jax import rundir
from kstore_jax.model import lora, probes, transformer
from kstore_jax.train import checkpoint, loop, metrics, optim, sharding, step as step_lib


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


@pytest.mark.parametrize("norm_apart", [False, True])
def test_train_step_is_one_adamw_update(norm_apart):
  """make_train_step: the gradient clipped to global norm 1, Adam's first (bias-corrected)
  step g / (|g| + eps), weight decay on matrices only, times lr(0); metrics of the step.
  `norm_apart` (a grid cohort's step) reads param_norm behind a barrier: the same numbers."""
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
  train_step = step_lib.make_train_step(loss_fn, norm_apart=norm_apart)
  args = (state, jnp.float32(1.0), {"t": jnp.asarray(t, jnp.float32)}, hp)
  assert ("optimization_barrier" in str(jax.make_jaxpr(train_step)(*args))) == norm_apart
  new, metrics = jax.jit(train_step)(*args)

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


def test_microbatched_step_is_the_whole_batch_step():
  """make_train_step(loss, M): the batch's gradient summed over M row sets one at a time is
  the whole-batch step's (loss, token count, grad norm, each gradient) up to float order,
  though the microbatches hold different numbers of target tokens (a token mean of token
  means would differ); and the rows go to microbatch i % M."""
  cfg = base.get_config("tiny").model
  cfg.update(num_layers=1, d_model=32, num_heads=2, d_ff=64)
  model = transformer.Transformer(transformer.ModelConfig.from_config(cfg, 64, "cpu"))
  rng = np.random.default_rng(0)
  B, L = 8, 16
  weights = (rng.random((B, L)) < np.linspace(0.1, 0.9, B)[:, None]).astype(np.float32)
  batch = {"inputs": rng.integers(0, 64, (B, L)), "targets": rng.integers(0, 64, (B, L)),
           "positions": np.tile(np.arange(L), (B, 1)), "segment_ids": np.ones((B, L)),
           "weights": weights}
  batch = {k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32)
           for k, v in batch.items()}
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch["inputs"][:1])["params"])
  hp = optim.hyperparams(stage_cfg(0))
  state = {"step": jnp.int32(0), "params": params,
           "opt_state": jax.jit(optim.make_optimizer(hp).init)(params)}
  loss_fn = step_lib.make_lm_loss(model)
  whole = jax.jit(step_lib.make_train_step(loss_fn))(state, None, batch, hp)
  parts = jax.jit(step_lib.make_train_step(loss_fn, 4))(state, None, batch, hp)
  for k in ("loss", "loss_tokens", "grad_norm", "param_norm"):
    np.testing.assert_allclose(float(parts[1][k]), float(whole[1][k]), rtol=1e-5, err_msg=k)
  assert float(whole[1]["loss_tokens"]) == weights.sum()
  (_, _), g_parts = jax.jit(step_lib.accumulated_value_and_grad(loss_fn, 4))(params, None, batch)
  (_, _), g_whole = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, None, batch)
  for a, b in zip(jax.tree.leaves(g_parts), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.abs(b).max()))
  # an unweighted mean of the microbatches' token means is another number: the test can fail
  part_loss = jax.jit(lambda p, b: loss_fn(p, None, b)[0])   # (one program for the 4 parts)
  means = [float(part_loss(params, {k: v[m::4] for k, v in batch.items()})) for m in range(4)]
  assert abs(np.mean(means) - float(whole[1]["loss"])) > 1e-3
  # microbatch m = rows m::M: each of the M parts' own loss, weighted, gives the batch's
  tokens = [weights[m::4].sum() for m in range(4)]
  np.testing.assert_allclose(np.dot(means, tokens) / sum(tokens), float(whole[1]["loss"]),
                             rtol=1e-5)


def decayed(tree) -> tuple[set, set]:
  """(paths of the leaves optim.decay_mask decays, paths of the others) of `tree`, a path
  as its keys joined by '/' (a boxed leaf's `.value` left out)."""
  out = (set(), set())
  for path, decays in jax.tree_util.tree_flatten_with_path(optim.decay_mask(tree))[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", None))) for k in path
            if not isinstance(k, jax.tree_util.GetAttrKey)]
    out[0 if decays else 1].add("/".join(keys))
  return out


def test_decay_mask_spares_biases_and_norm_scales_of_any_rank():
  """Weight decay on kernels, embeddings and low-rank factors only, whatever a leaf's rank:
  GPT-2's query/key/value biases are [H, K] and a linear probe head's bias [J, C], yet not
  decayed; LoRA's `b` factor (beside its `a`) is. The model's params as init makes them
  (boxed) and as the step sees them (unboxed)."""
  cfg = base.get_config("tiny").model
  cfg.update(num_layers=1, d_model=32, num_heads=2, d_ff=64, block="gpt2")
  model = transformer.Transformer(transformer.ModelConfig.from_config(cfg, 128, "cpu"))
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, 8), jnp.int32))["params"])
  kernels = {f"block0/{m}/{p}/kernel" for m, ps in (("attn", ("query", "key", "value", "out")),
                                                     ("mlp", ("up", "down"))) for p in ps}
  spared = ({f"block0/{m}/{p}/bias" for m, ps in (("attn", ("query", "key", "value", "out")),
                                                  ("mlp", ("up", "down"))) for p in ps}
            | {f"{n}/LayerNorm_0/{k}" for n in ("block0/ln1", "block0/ln2", "ln_f")
               for k in ("scale", "bias")})
  assert boxed["block0"]["attn"]["query"]["bias"].value.ndim == 2   # [H, K]
  for params in (boxed, nn.meta.unbox(boxed)):
    assert decayed(params) == (kernels | {"embed/embedding"}, spared)

  probe = probes.init(jax.random.PRNGKey(0), vocab=128, d_model=32, embed_rank=2,
                      n_positions=6, classes=[12, 5], head="linear")
  assert probe["heads"][0]["b"].shape == (6, 12)   # [J, C]
  assert decayed(probe) == ({"embed_a", "embed_b", "heads/0/w", "heads/1/w"},
                            {"heads/0/b", "heads/1/b", "ln/scale", "ln/bias"})
  probe = probes.init(jax.random.PRNGKey(0), vocab=128, d_model=32, embed_rank=2,
                      n_positions=6, classes=[12, 5], head="embedding")
  assert decayed(probe) == ({"embed_a", "embed_b", "heads/0/m", "heads/1/m"},
                            {"ln/scale", "ln/bias"})
  factors = lora.init(jax.random.PRNGKey(0), nn.meta.unbox(boxed), rank=2, embed_rank=2)
  assert decayed(factors) == ({f"{n}/{f}" for n in ("block0/query", "block0/value", "embed")
                               for f in "ab"}, set())


def one_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})


def quadratic(params, frozen, batch):
  """The toy stages' loss (one function: the tests' stages share its jitted steps)."""
  return 0.5 * jnp.sum((params["w"] - batch["t"]) ** 2), {}


def toy_spec(sc, targets=(), eval_fn=None) -> loop.StageSpec:
  """A stage of config `sc` pulling w [2, 3] towards one target value per step (`targets`:
  batches of one row; a NaN one makes the params NaN from its step on)."""
  rows = [{"t": np.full((1, 2, 3), t, np.float32)} for t in targets]
  return loop.StageSpec(
      name="toy", stage_cfg=sc, loss_fn=quadratic,
      init_params=lambda rng, args: {"w": jax.random.normal(rng, (2, 3))}, frozen=None,
      data=lambda process_index, process_count: grain.MapDataset.source(rows).to_iter_dataset(),
      positions_per_step=1, flops_per_position=1.0, export=lambda params, frozen: params,
      eval_fn=eval_fn)


def run_cfg(steps: int, log_every: int, save_every: int, eval_every: int = 0,
            save_minutes: float = 0.0):
  """(stage config of `steps` steps, run config with its `train` section)."""
  sc = base.stage(steps=steps, batch_size=1, lr=0.1, warmup_steps=0, weight_decay=0.0)
  return sc, ml_collections.ConfigDict(dict(seed=0, train=dict(
      log_every=log_every, save_every=save_every, save_minutes=save_minutes,
      keep_checkpoints=5, eval_every=eval_every, profile_steps="", memory_gb=0.0)))


def saved_steps(stage_dir) -> list[int]:
  c = checkpoint.Checkpointer(rundir.checkpoints_dir(str(stage_dir)), keep=5)
  try:
    return sorted(c.manager.all_steps())
  finally:
    c.close()


def logged_steps(stage_dir, key: str = "loss") -> list[int]:
  return [r["step"] for r in rundir.read_metrics(rundir.metrics_file(str(stage_dir)))
          if key in r]


def test_save_minutes_saves_by_the_clock_and_changes_no_loss(tmp_path):
  """train.save_minutes: a checkpoint once that many minutes have passed since the last one,
  at any step of one process, whatever save_every says (a clock always due: every step saved,
  where the step count alone saves only the last; a 10-minute one adds none here); the saves
  change no loss."""
  losses = {}
  for minutes, saved in ((1e-9, [1, 2, 3, 4, 5]), (10.0, [5]), (0.0, [5])):
    sc, cfg = run_cfg(steps=5, log_every=2, save_every=100, save_minutes=minutes)
    wd = tmp_path / str(minutes)
    loop.run_stage(toy_spec(sc, [1.0, 2.0, 3.0, 4.0, 5.0]), cfg, str(wd), one_device_mesh())
    assert saved_steps(wd) == saved, minutes
    losses[minutes] = [(r["step"], r["loss"]) for r in
                       rundir.read_metrics(rundir.metrics_file(str(wd))) if "loss" in r]
  assert losses[1e-9] == losses[10.0] == losses[0.0] and len(losses[0.0]) == 3   # 2, 4, 5
  # a grid cohort (the clock's main user: ten runs' saves at once) saves every member by it
  sc, cfg = run_cfg(steps=3, log_every=2, save_every=100, save_minutes=1e-9)
  loop.run_cohort([loop.Member(toy_spec(sc, [float(t)] * 3), str(tmp_path / n), 0, n)
                   for n, t in (("a", 1), ("b", 2))], cfg.train, one_device_mesh())
  assert saved_steps(tmp_path / "a") == saved_steps(tmp_path / "b") == [1, 2, 3]


def test_nan_state_is_never_saved_whatever_log_every(tmp_path):
  """A save step that is no log step (save_every 3, log_every 10) has its metrics checked all
  the same: the params gone NaN at step 4 stop the run at the save of step 6, so the
  checkpoints hold step 3 only ("last good checkpoint kept" is true, a rerun resumes there)."""
  sc, cfg = run_cfg(steps=10, log_every=10, save_every=3)
  targets = [1.0] * 10
  targets[3] = math.nan   # step 4
  with pytest.raises(loop.NonFiniteLoss, match=r"at step 6 \(loss=nan\)"):
    loop.run_stage(toy_spec(sc, targets), cfg, str(tmp_path), one_device_mesh())
  assert saved_steps(tmp_path) == [3]


def test_eval_row_is_written_before_its_step_is_saved(tmp_path, monkeypatch):
  """At a step that both evaluates and saves, the eval row is in metrics.jsonl before the
  save starts: a run killed during the eval resumes from an older step and evaluates this
  one again (saved first, a resume from it would never write the row)."""
  sc, cfg = run_cfg(steps=6, log_every=1, save_every=3, eval_every=2)
  evals_at_save = []
  save = checkpoint.Checkpointer.save

  def recorded_save(self, step, state, data_iter):
    evals_at_save.append((step, logged_steps(tmp_path, "w_mean")))
    save(self, step, state, data_iter)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", recorded_save)
  eval_fn = lambda params: {"w_mean": float(params["w"].mean())}
  loop.run_stage(toy_spec(sc, [1.0] * 6, eval_fn), cfg, str(tmp_path), one_device_mesh())
  assert evals_at_save == [(3, [2]), (6, [2, 4, 6])]


def test_a_signal_during_an_eval_stops_at_a_saved_step(tmp_path):
  """SIGTERM arriving during step 4's eval (no save step): the run stops at a step it saves
  (it stopped at 4 unsaved, saying "checkpoint saved", and lost the steps since 3)."""
  sc, cfg = run_cfg(steps=10, log_every=1, save_every=3, eval_every=2)

  def eval_fn(params):
    eval_fn.calls += 1
    if eval_fn.calls == 2:   # step 4's
      os.kill(os.getpid(), signal.SIGTERM)
    return {"w_mean": float(params["w"].mean())}

  eval_fn.calls = 0
  with pytest.raises(loop.Interrupted, match=r"SIGTERM at step (\d+); checkpoint saved") as e:
    loop.run_stage(toy_spec(sc, [1.0] * 10, eval_fn), cfg, str(tmp_path), one_device_mesh())
  stopped = int(str(e.value).split("at step ")[1].split(";")[0])
  assert stopped in saved_steps(tmp_path), (stopped, saved_steps(tmp_path))


def test_a_second_ctrl_c_stops_at_once():
  """The first SIGINT asks for a save at the next step; a second one (a run stuck in a compile
  or a collective) raises KeyboardInterrupt instead of being swallowed; the handler before it
  comes back (Python's, or SIG_IGN in a process started in a shell's background)."""
  before = signal.getsignal(signal.SIGINT)
  with loop._Signals() as signals:
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.caught == "SIGINT" and signals.agreed(shared=False) == ("SIGINT", False)
    with pytest.raises(KeyboardInterrupt, match="a second SIGINT"):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


def test_throughput_is_of_trained_steps(tmp_path):
  """tokens/s and step time count neither the first step's compile nor evals: the first
  logged row has no rate, and with a 0.3 s eval every second step no row's step time
  reaches it (the toy's steps take milliseconds)."""
  sc, cfg = run_cfg(steps=8, log_every=1, save_every=100, eval_every=2)

  def eval_fn(params):
    time.sleep(0.3)
    return {"w_mean": float(params["w"].mean())}

  loop.run_stage(toy_spec(sc, [1.0] * 8, eval_fn), cfg, str(tmp_path), one_device_mesh())
  rows = [r for r in rundir.read_metrics(rundir.metrics_file(str(tmp_path))) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert "step_time_s" not in rows[0] and "tokens_per_s" not in rows[0]
  assert all(r["step_time_s"] < 0.15 for r in rows[1:]), [r.get("step_time_s") for r in rows]


def test_a_run_that_diverges_leaves_its_cohort_training(tmp_path):
  """A vmapped cohort of three, the middle one's target NaN from step 4: it stops there (no
  checkpoint past step 3, no final params), the other two train all 8 steps and are saved,
  and NonFiniteLoss names only it (one NaN stopped the whole cohort, every rerun again)."""
  sc, cfg = run_cfg(steps=8, log_every=1, save_every=3)
  targets = {"a": [1.0] * 8, "bad": [1.0] * 3 + [float("nan")] * 5, "c": [2.0] * 8}
  with pytest.raises(loop.NonFiniteLoss,
                     match=r"^\[bad\] non-finite grad_norm, loss, param_norm at step 4 ") as e:
    loop.run_cohort([loop.Member(toy_spec(sc, t), str(tmp_path / n), 0, n)
                     for n, t in targets.items()], cfg.train, one_device_mesh())
  assert e.value.members == ["bad"]
  for n in ("a", "c"):
    assert logged_steps(tmp_path / n) == list(range(1, 9)), n
    assert saved_steps(tmp_path / n)[-1] == 8 and os.path.isdir(rundir.final_dir(str(tmp_path / n)))
  assert logged_steps(tmp_path / "bad") == [1, 2, 3] and saved_steps(tmp_path / "bad") == [3]
  assert not os.path.exists(rundir.final_dir(str(tmp_path / "bad")))


def test_a_run_that_diverges_while_catching_up_leaves_the_others_training(tmp_path):
  """Member a stands at step 3, b at 0 and diverges at step 2 of its catch-up: a trains on
  to the end (the catch-up's empty cohort raised for both)."""
  a, b = tmp_path / "a", tmp_path / "b"
  sc, cfg = run_cfg(steps=3, log_every=1, save_every=3)
  loop.run_stage(toy_spec(sc, [1.0] * 3), cfg, str(a), one_device_mesh())
  os.rename(rundir.final_dir(str(a)), tmp_path / "final_of_a")   # a stands at its step 3
  sc, cfg = run_cfg(steps=6, log_every=1, save_every=3)
  with pytest.raises(loop.NonFiniteLoss) as e:
    loop.run_cohort([loop.Member(toy_spec(sc, [1.0] * 6), str(a), 0, "a"),
                     loop.Member(toy_spec(sc, [1.0] + [float("nan")] * 5), str(b), 0, "b")],
                    cfg.train, one_device_mesh())
  assert e.value.members == ["b"]
  assert logged_steps(a) == [1, 2, 3, 4, 5, 6] and os.path.isdir(rundir.final_dir(str(a)))
  assert logged_steps(b) == [1] and not os.path.exists(rundir.final_dir(str(b)))


def test_a_cohort_eval_holds_one_runs_copy_at_a_time(tmp_path):
  """During a cohort's eval the device holds the stacked state, the step's batch and one
  run's params, not a copy of every run's whole state (split all at once, they doubled the
  cohort's memory at every eval and save)."""
  n = 256 * 256 * 4                          # bytes of w [256, 256]; a run's state: w, mu, nu
  rows = [{"t": np.ones((1, 256, 256), np.float32)}] * 5
  sc, cfg = run_cfg(steps=5, log_every=100, save_every=100, eval_every=2)   # evals at 2, 4
  base = sum(a.nbytes for a in jax.live_arrays())
  held = []

  def spec():
    return loop.StageSpec(
        name="toy", stage_cfg=sc, loss_fn=quadratic,
        init_params=lambda rng, args: {"w": jax.random.normal(rng, (256, 256))}, frozen=None,
        data=lambda process_index, process_count: grain.MapDataset.source(rows).to_iter_dataset(),
        positions_per_step=1, flops_per_position=1.0, export=lambda params, frozen: params,
        eval_fn=lambda p: held.append(sum(a.nbytes for a in jax.live_arrays()) - base) or {})

  loop.run_cohort([loop.Member(spec(), str(tmp_path / k), 0, k) for k in "abc"], cfg.train,
                  one_device_mesh())
  stacked, batch, one = 3 * 3 * n, 3 * n, n
  assert len(held) == 6 and max(held) <= stacked + batch + one + n // 4, (held, stacked)


def test_catch_up_to_a_step_that_is_no_save_step_logs_it(tmp_path):
  """A cohort whose member A stands at step 3 (say, stopped by SIGTERM) and B at 0: B trains
  alone to step 3, which is no save step, then both to 6. B's metrics have every step, 3
  included (that step's metrics were pending when the catch-up ended), as A's have."""
  a, b = tmp_path / "a", tmp_path / "b"
  sc, cfg = run_cfg(steps=3, log_every=1, save_every=5)
  loop.run_stage(toy_spec(sc, [1.0] * 3), cfg, str(a), one_device_mesh())
  os.rename(rundir.final_dir(str(a)), tmp_path / "final_of_a")   # A stands at its step 3
  sc, cfg = run_cfg(steps=6, log_every=1, save_every=5)
  loop.run_cohort([loop.Member(toy_spec(sc, [1.0] * 6), str(a), 0, "a"),
                   loop.Member(toy_spec(sc, [2.0] * 6), str(b), 0, "b")],
                  cfg.train, one_device_mesh())
  assert logged_steps(a) == logged_steps(b) == [1, 2, 3, 4, 5, 6]


def test_stages_differing_in_hyperparameters_share_one_program():
  """The optimizer's numbers are arguments of the compiled step (optim.hyperparams), so two
  stages of the same shapes that differ in steps, warmup, lr, decay, betas and clip lower to
  the same program (one executable from the persistent compilation cache for pretrain ->
  finetune, or runs of other lengths) and, in one process, share one jitted function; each
  still steps with its own schedule."""
  mesh = one_device_mesh()
  cfgs = [stage_cfg(2), base.stage(steps=37, batch_size=1, lr=3e-3, warmup_steps=0,
                                    weight_decay=0.0)]
  cfgs[1].update(b1=0.8, b2=0.95, final_lr_fraction=0.5, grad_clip=0.5)
  batch = {"t": jax.device_put(jnp.ones((2, 3), jnp.float32), sharding.batch_sharding(mesh))}
  texts, lrs, jitted = [], [], []
  for sc in cfgs:
    init, rng, abstract, _, train_step = loop.compile_stage(toy_spec(sc), mesh, 0)
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


def test_metrics_truncation_on_resume_is_all_or_nothing(tmp_path, monkeypatch):
  """On resume metrics.jsonl is cut back to the restored step. It was truncated in place, so
  a kill (here: an error) while rewriting it lost the stage's whole history; now the kept
  rows go to a temporary file renamed over the old one."""
  w = metrics.MetricsWriter(str(tmp_path), resume_step=0)
  for s in (10, 20, 30):
    w.write(s, {"loss": 1.0 / s})
  w.close()
  before = (tmp_path / rundir.METRICS).read_text()
  real = metrics.json.dumps
  calls = []

  def dies_midway(obj, *a, **k):
    calls.append(obj)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed while rewriting")
    return real(obj, *a, **k)

  monkeypatch.setattr(metrics.json, "dumps", dies_midway)
  with pytest.raises(KeyboardInterrupt):
    metrics.MetricsWriter(str(tmp_path), resume_step=20)
  monkeypatch.setattr(metrics.json, "dumps", real)
  assert (tmp_path / rundir.METRICS).read_text() == before
  metrics.MetricsWriter(str(tmp_path), resume_step=20).close()
  assert [r["step"] for r in rundir.read_metrics(str(tmp_path / rundir.METRICS))] == [10, 20]


def tensorboard_events(directory) -> list:
  """Every event of the TensorBoard files in `directory`, file by file (TFRecord framing:
  length u64, its crc u32, the Event proto, its crc u32)."""
  import struct

  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      out.append(event_pb2.Event.FromString(data[at + 12:at + 12 + n]))
      at += 12 + n + 4
  return out


def test_resume_purges_tensorboard_points_past_the_restored_step(tmp_path):
  """Steps 10..30 logged, then a resume from step 20: the new event file starts by purging
  from step 21, so TensorBoard shows step 30 once (the run's new one), as metrics.jsonl. A
  start from step 0 purges from step 1 (a run killed before its first save restarts)."""
  w = metrics.MetricsWriter(str(tmp_path), resume_step=0)
  for step in (10, 20, 30):
    w.write(step, {"loss": 1.0 / step})
  w.close()
  time.sleep(1.1)   # tensorboardX names event files by the second
  w = metrics.MetricsWriter(str(tmp_path), resume_step=20)
  w.write(30, {"loss": 0.5})
  w.close()
  purges = [e for e in tensorboard_events(tmp_path) if e.HasField("session_log")]
  assert [(e.step, e.session_log.status) for e in purges] == [(1, 1), (21, 1)]   # 1: START


@pytest.mark.parametrize("kind, dtype, want", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    # NVL matched 'H100' (SXM's 989): its MFU read ~15% low
    ("NVIDIA H100 NVL", "bfloat16", 835.5e12), ("NVIDIA H100 NVL", "float32", 417.5e12),
    ("NVIDIA H200 NVL", "bfloat16", 835.5e12), ("NVIDIA H200 NVL", "float32", 417.5e12),
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA GH200 480GB", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12), ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5 lite", "float32", None), ("cpu", "float32", None)])
def test_peak_flops_by_device_kind(kind, dtype, want):
  assert loop.peak_flops(kind, dtype) == want


def test_attention_within_documents_counted_by_hand():
  """`bench train`'s within-documents share: rows [a a a b b . . .] and [c c c c c c c c] of
  L = 8 need (6 + 3) and 36 of the 2 x 64 query-key pairs MFU's accounting counts; a batch
  stacked over runs ([R, B, L]) counts the same."""
  from kstore_jax.data import batches
  from kstore_jax.train import throughput
  seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1] * 8])
  assert throughput.within_documents([{batches.SEGMENT_IDS: seg}]) == 45 / 128
  assert throughput.within_documents([{batches.SEGMENT_IDS: np.stack([seg, seg])}]) == 45 / 128
