"""Train-step throughput (`python -m kstore_jax.bench train`): tokens/s, step time, achieved
FLOP/s, and the machine's own ceilings measured in the same process: a dense matmul in the
compute dtype (random data: zeros run faster on some chips) and a device-memory copy."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kstore_jax.data import batches as batches_lib
from kstore_jax.model import transformer
from kstore_jax.train import loop, sharding

GPT2_VOCAB = 50_304   # GPT-2's 50,257 tokens padded to a multiple of 64 (nanoGPT, llm.c)
TRACED_HLO = "train_step.hlo.txt"   # in a `measure` trace_dir: the traced step's optimised HLO


def median_time(fn, *args, repeats: int) -> float:
  """Median seconds of `fn(*args)` after one warm-up call (compile), synchronised."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def matmul_flops_per_s(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` on random normal data (median of `repeats`;
  two input pairs alternate so a cache does not hold the whole problem)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  xs = [jax.random.normal(k, (n, n), transformer.DTYPES[dtype]) for k in keys]
  mm = jax.jit(lambda a, b, c, d: (a @ b, c @ d))
  return 2 * 2 * n ** 3 / median_time(mm, *xs, repeats=repeats)


def copy_bytes_per_s(n_bytes: int = 1 << 30, repeats: int = 10) -> float:
  """Device-memory bandwidth of a copy (bytes read + bytes written per second)."""
  x = jax.random.normal(jax.random.PRNGKey(1), (n_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a * jnp.float32(1.0001))   # one read, one write; not elided
  return 2 * n_bytes / median_time(copy, x, repeats=repeats)


def first_batches(spec: loop.StageSpec, mesh, n: int = 4) -> list[dict]:
  """The first `n` batches of the stage's pipeline, as this process's rows (timed steps
  cycle through them)."""
  it = iter(spec.data(jax.process_index(), jax.process_count()))
  return [next(it) for _ in range(n)]


def timed_steps(step_fn, state, frozen, batches, n: int, mesh):
  """`n` synchronised calls `state, metrics = step_fn(state, frozen, batch)` cycling through
  the global `batches` on `mesh`, with the loop's heap bound: (seconds of each call, state,
  metrics, the heap.Bound: `inline`, the steps ran inline; `released`, it released the heap)."""
  times = []
  bound = loop.heap_bound(mesh)   # as the training loop runs
  for i in range(n):
    t = time.perf_counter()
    state, metrics = step_fn(state, frozen, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    bound.after_step()
    times.append(time.perf_counter() - t)
  return times, state, metrics, bound


def within_documents(local: list[dict]) -> float:
  """The share of the attention FLOPs MFU's accounting counts (every position against its
  row's L positions, `transformer.flops_per_token`) that attending causally within each
  packed document needs: sum over the rows' documents of n (n + 1) / 2, over L^2 a row, in
  the LM batches `local`. A kernel that walks only those (cpu_docs, pallas_docs) does about
  this much of the counted attention work."""
  segs = [np.asarray(b[batches_lib.SEGMENT_IDS]) for b in local]
  seg = np.concatenate([s.reshape(-1, s.shape[-1]) for s in segs])   # ([R, B, L]: a cohort's)
  n = np.stack([np.bincount(row, minlength=seg.max() + 1)[1:] for row in seg])
  return float((n * (n + 1) / 2).sum() / (seg.shape[0] * seg.shape[1] ** 2))


def measure(spec: loop.StageSpec, mesh, seed: int, model_cfg: transformer.ModelConfig,
            steps: int = 10, warmup: int = 2, trace_dir: str | None = None,
            trace_steps: int = 3, runs: int = 0) -> dict:
  """Time `steps` jitted train steps of the stage `spec` (of the model `model_cfg`) on `mesh`,
  on real pipeline batches (`bench train` builds the spec: an Experiment's pretrain stage,
  its output head widened to GPT2_VOCAB on request). `trace_dir`: then `trace_steps` more
  steps under `jax.profiler` (a Perfetto trace in it, and the step's optimised HLO text in
  TRACED_HLO). `runs` >= 1: the step of a grid cohort of that many runs (vmapped over a
  leading run axis, replicated; run i initialised from seed + i, every run on the same
  batches); tokens/s and FLOP/s are then the cohort's, the loss the runs' mean."""
  t0 = time.perf_counter()
  local = first_batches(spec, mesh)
  if runs:
    train_step, state, frozen, batches = cohort_setup(
        [loop.Member(spec, "", seed + i, str(i)) for i in range(runs)], mesh,
        local=[local] * runs)
  else:
    init, rng, _, _, train_step = loop.compile_stage(spec, mesh, seed)
    batches = [sharding.to_global(b, mesh) for b in local]
    state, frozen = init(rng, spec.init_args), spec.frozen
  # the step's trace, lowering and compile alone (on a GPU, XLA's GEMM autotuning among
  # them), timed apart from the first call, which reuses it (jax's in-memory caches)
  t1 = time.perf_counter()
  train_step.lower(state, frozen, batches[0]).compile()
  compile_s = time.perf_counter() - t1
  times, state, metrics, bound = timed_steps(train_step, state, frozen, batches,
                                             warmup + steps, mesh)
  first_s = time.perf_counter() - t0 - sum(times[1:])   # compile, init and the first step
  if trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for i in range(trace_steps):
        state, metrics = train_step(state, frozen, batches[i % len(batches)])
        jax.block_until_ready(metrics)
    # the traced executable's optimised HLO (its instructions name the trace's ops; their
    # metadata, the jax code they came from): jax's in-memory cache, no second compile
    with open(os.path.join(trace_dir, TRACED_HLO), "w") as f:
      f.write(train_step.lower(state, frozen, batches[0]).compile().as_text())
  step_s = float(np.median(times[warmup:]))
  tokens = spec.positions_per_step * max(runs, 1)
  flops = spec.flops_per_position * tokens / step_s
  L = spec.positions_per_step // spec.stage_cfg.batch_size
  attention = transformer.flops_per_token(model_cfg, L) - transformer.flops_per_token(model_cfg, 0)
  inside = within_documents(local)
  return dict(step_s=step_s, tokens_per_s=tokens / step_s, flops_per_s=flops,
              attention_share=attention / spec.flops_per_position,
              attention_within_documents=inside,
              flops_per_s_within_documents=(spec.flops_per_position - attention * (1 - inside))
              * tokens / step_s,
              params=int(transformer.count_params(state["params"])) // max(runs, 1),
              vocab=model_cfg.vocab_size, dtype=model_cfg.dtype,
              attention=model_cfg.attention, norm=model_cfg.norm, first_step_s=first_s,
              compile_s=compile_s,
              loss=float(np.mean(metrics["loss"])),
              peak=loop.device_peak_flops(model_cfg.dtype), heap_released=bound.released,
              steps_inline=bound.inline)


BARRIER_GO = "go"


def barrier_wait(directory: str, poll_s: float = 0.01) -> None:
  """One of several processes timed side by side is warmed up: say so (`ready.<pid>` in
  `directory`) and wait for the parent's `go` there (bench grid's processes mode)."""
  open(os.path.join(directory, f"ready.{os.getpid()}"), "w").close()
  while not os.path.exists(os.path.join(directory, BARRIER_GO)):
    time.sleep(poll_s)


def alone_step_s(members: list[loop.Member], mesh, steps: int = 5, warmup: int = 2,
                 ready=None) -> float:
  """Sum over the members of the median seconds of one step of their stage, each trained
  alone with its plain jitted step (as `main` runs it), on its first pipeline batches. Every
  member is compiled and warmed up before any is timed; `ready()`, called between, is where
  processes timed side by side wait for each other (bench grid's processes mode: no one's
  steps timed while another compiles)."""
  warm = []
  for m in members:
    init, rng, _, _, step = loop.compile_stage(m.spec, mesh, m.seed)
    batches = [sharding.to_global(b, mesh) for b in first_batches(m.spec, mesh)]
    _, state, _, _ = timed_steps(step, init(rng, m.spec.init_args), m.spec.frozen, batches,
                                 warmup, mesh)
    warm.append((step, state, m.spec.frozen, batches))
  if ready is not None:
    ready()
  return sum(float(np.median(timed_steps(step, state, frozen, batches, steps, mesh)[0]))
             for step, state, frozen, batches in warm)


def cohort_setup(members: list[loop.Member], mesh, run_axis: str | None = None,
                 local: list[list[dict]] | None = None):
  """The members' stage vmapped together as the grid runs it (the run axis placed by
  `run_axis`): (its jitted step, the stacked initial state, the stacked frozen trees, global
  batches [R, B, L] of each member's first pipeline batches, or of `local`'s)."""
  local = local or [first_batches(m.spec, mesh) for m in members]
  init, _, _, shardings = loop.build_state(members[0].spec, mesh, members[0].seed)
  step = loop.compile_step(members[0].spec, mesh, shardings, runs=True, run_axis=run_axis)
  state = loop.stack_runs([init(jax.random.PRNGKey(m.seed), m.spec.init_args)
                           for m in members], shardings, run_axis)
  frozen = loop.stack_runs([m.spec.frozen for m in members])
  batches = [sharding.to_global_stacked([rows[i] for rows in local], mesh, run_axis)
             for i in range(len(local[0]))]
  return step, state, frozen, batches


def cohort_step_s(members: list[loop.Member], mesh, steps: int = 5, warmup: int = 2,
                  run_axis: str | None = None) -> float:
  """Median seconds of one step of the members' stage vmapped together in one cohort step
  (as the grid runs them, the run axis placed by `run_axis`), on the same batches as
  `alone_step_s`."""
  step, state, frozen, batches = cohort_setup(members, mesh, run_axis)
  times, *_ = timed_steps(step, state, frozen, batches, warmup + steps, mesh)
  return float(np.median(times[warmup:]))
