"""Train-step throughput: tokens/s, step time, achieved FLOP/s, and its ratio to the dense
matmul FLOP/s of this machine measured in the same process (`python -m kstore_jax.bench train`)."""

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from kstore_jax.train import loop, sharding


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
  """Best-of-`repeats` FLOP/s of an n x n x n f32 matmul (the machine's dense reference)."""
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def measure(cfg, steps: int = 10, warmup: int = 2, stage: str = "pretrain") -> dict:
  """Time `steps` jitted train steps of `stage` on real pipeline batches."""
  from kstore_jax import experiment
  from kstore_jax.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.get_tokenizer(cfg.data)
  with tempfile.TemporaryDirectory() as tmp:
    exp = experiment.Experiment(cfg, tok, experiment.Workdir(tmp))
    spec = exp.train_spec(stage)
    init, rng, _, _, train_step = loop.compile_stage(spec, exp.mesh, cfg.seed)
    state = init(rng)
    it = iter(spec.data(jax.process_index(), jax.process_count()))
    batches = [sharding.to_global(next(it), exp.mesh) for _ in range(4)]
    times = []
    for i in range(warmup + steps):
      t = time.perf_counter()
      state, metrics = train_step(state, spec.frozen, batches[i % len(batches)])
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times[warmup:]))
  tokens = spec.positions_per_step
  flops = spec.flops_per_position * tokens / step_s
  return dict(step_s=step_s, tokens_per_s=tokens / step_s, flops_per_s=flops,
              params=int(sum(x.size for x in jax.tree.leaves(state["params"]))),
              vocab=exp.model_cfg.vocab_size, peak=loop.device_peak_flops())
