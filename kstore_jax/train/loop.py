"""The training loop of one stage: Grain batches -> jitted step on the mesh -> metrics,
checkpoints (with the data iterator), NaN guard, SIGTERM/SIGINT save, final params export."""

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import kstore_jax
from kstore_jax import heap, rundir
from kstore_jax.data import batches
from kstore_jax.errors import ConfigError
from kstore_jax.model import attention
from kstore_jax.train import (checkpoint, memory, metrics as metrics_lib, optim, profiling,
                              sharding, step as step_lib)

# Dense peak FLOP/s by device kind (datasheets) and compute dtype, for MFU; float32 on a GPU
# runs XLA's default-precision matmuls as TF32. Longest matching kind wins; absent: no MFU.
PEAK_FLOPS = {
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835.5e12, "float32": 417.5e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},       # SXM ("NVIDIA H100 80GB HBM3")
    "H200 NVL": {"bfloat16": 835.5e12, "float32": 417.5e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},        # SXM
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},                   # v5e
    "TPU v5p": {"bfloat16": 459e12}, "TPU v5": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},                   # v6e (Trillium)
}


class NonFiniteLoss(RuntimeError):
  """A run's metrics (loss, gradient or parameter norm) went non-finite; `members`: the labels
  of the runs that did (a vmapped cohort's others trained on and were saved)."""

  def __init__(self, message: str, members=()):
    super().__init__(message)
    self.members = list(members)


class Interrupted(RuntimeError):
  pass


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """One device's dense peak FLOP/s for compute `dtype` (PEAK_FLOPS: the longest kind that
  the device kind contains; GH200 is an H200's chip), or None."""
  for k, v in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if k in device_kind:
      return v.get(dtype)
  return None


def device_peak_flops(dtype: str) -> float | None:
  """Summed dense peak FLOP/s of all devices for compute `dtype` (peak_flops), or None."""
  one = peak_flops(jax.devices()[0].device_kind, dtype)
  return None if one is None else one * jax.device_count()


@dataclasses.dataclass
class StageSpec:
  """What a training stage optimises; built by main from the config."""
  name: str
  stage_cfg: Any
  loss_fn: Callable            # (params, frozen, batch) -> (loss, aux)
  init_params: Callable        # (rng, init_args) -> params (may be boxed, logical partitioning)
  frozen: Any                  # already-sharded pytree the loss reads but does not train
  data: Callable               # (process_index, process_count) -> grain IterDataset of batches
  positions_per_step: int      # token positions in one global batch (for tokens/s)
  flops_per_position: float
  export: Callable             # (params, frozen) -> effective model params for final/
  eval_fn: Callable | None = None   # effective params -> {name: float}, run every eval_every
  dtype: str = "float32"       # the model's compute dtype (the MFU's peak)
  init_args: Any = None        # arrays init_params reads (a base model's params), passed as
                               # arguments: one compiled init serves every run of a cohort
  microbatches: int = 1        # the step's gradient over this many parts of the batch, one
                               # after another (train.microbatch_rows; LM stages)
  less_memory: str = ""        # the config keys that make the step need less memory (a
                               # refusal's hint: check_fits)
  platform: str = "cpu"        # where the step runs (the model's platform): off the CPU the
                               # gradient's and params' norms in one pass (optim.global_norm)


def _fmt_time(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Signals:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step and stops. A
  second Ctrl-C stops at once (KeyboardInterrupt: a run stuck in a compile, an eval or a
  collective can still be stopped from the keyboard)."""

  def __init__(self):
    self.caught = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.caught and signum == signal.SIGINT:
      raise KeyboardInterrupt(f"a second SIGINT after {self.caught}: stopped without saving")
    self.caught = signal.Signals(signum).name

  def agreed(self, shared: bool, late: bool = False) -> tuple[str | None, bool]:
    """(the signal to stop at this step on, whether to save by the clock: `late`, process 0's
    `_SaveClock.late()`). Every process of a cluster stops and saves at the same step (a
    process that alone was signalled, or saw its flag steps before the others, left them in
    the next step's collectives while it saved: a hang). With several processes the flags
    are gathered, in one collective, at `shared` steps (the same on every process: log and
    save steps), so a stop or a clock save waits for the next of them; one process stops at
    its next step."""
    if jax.process_count() == 1:
      return self.caught, late
    if not shared:
      return None, False
    flags = multihost_utils.process_allgather(
        np.array([self.caught is not None, late], np.int32))
    signal_name = (self.caught or "a signal to another process") if flags[:, 0].any() else None
    return signal_name, bool(flags[0, 1])

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class _SaveClock:
  """`train.save_minutes`: a checkpoint once that many minutes have passed since the stage
  started or last saved, besides every `save_every` steps (0: off). A run as fast as a GPU
  makes its step-count saves pauses it need not take, a slow one's saves lie hours apart: the
  clock bounds the work a crash can lose in time. With several processes process 0's clock
  decides (`_Signals.agreed`)."""

  def __init__(self, minutes: float):
    self.seconds, self.last = 60.0 * minutes, time.time()

  def late(self) -> bool:
    return bool(self.seconds) and time.time() - self.last >= self.seconds

  def saved(self) -> None:
    self.last = time.time()


# XLA:CPU options for the init program (threefry and a normal draw per parameter, run once
# per stage): XLA's lowest optimisation and its older loop emitters, 6.3 -> 1.1 s for a
# one-layer toy model (BENCHMARKS.md); without the concurrency-optimised scheduler, under
# which the older emitters let one program's collectives run in different orders on
# different devices (tests/runs.py), so they serve any mesh (a 2-device toy init 1.0-1.3 s ->
# 0.5).
INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                    "xla_cpu_use_fusion_emitters": False,
                    "xla_cpu_enable_concurrency_optimized_scheduler": False}


@functools.cache
def _supported(name: str, value) -> bool:
  """Whether this jaxlib's XLA knows compile option `name` (an upgrade may drop one)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError as e:
    if "No such compile option" in str(e):
      return False
    raise
  return True


def init_compiler_options(mesh) -> dict | None:
  """compiler_options for the jitted init on `mesh`: INIT_CPU_OPTIONS on CPU, those this XLA
  knows; None elsewhere."""
  if mesh.devices.flat[0].platform != "cpu":
    return None
  return {k: v for k, v in INIT_CPU_OPTIONS.items() if _supported(k, v)}


def build_state(spec: StageSpec, mesh, seed: int):
  """(init, rng, abstract state, state shardings): `init(rng, spec.init_args)` is
  the sharded initial state (eval_shape -> logical shardings -> jit(out_shardings)); the same
  compiled init serves any spec of the same cohort with its own rng and init_args."""
  optimizer = optim.make_optimizer(optim.hyperparams(spec.stage_cfg))   # its state's shape

  def init_boxed(rng, args):
    params = spec.init_params(rng, args)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(params)}

  rng = jax.random.PRNGKey(seed)
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(mesh):
    # (the key's shape alone: under another platform's abstract mesh, bench lower's, a CPU
    # array would not mix)
    abstract_boxed = jax.eval_shape(init_boxed, jax.ShapeDtypeStruct(rng.shape, rng.dtype),
                                    spec.init_args)
    shardings = sharding.logical_shardings(abstract_boxed, mesh)
    init = jax.jit(lambda r, a: nn.meta.unbox(init_boxed(r, a)), out_shardings=shardings,
                   compiler_options=init_compiler_options(mesh))
  # what eval_shape(init) gives, without tracing the model's init once more (~0.4 s at the
  # paper size; the first call of `init` traces it anyway)
  abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          nn.meta.unbox(abstract_boxed), shardings)
  return init, rng, abstract, shardings


def compile_stage(spec: StageSpec, mesh, seed: int):
  """(init, rng, abstract state, state shardings, jitted train_step(state, frozen, batch));
  the initial state is `init(rng, spec.init_args)`."""
  init, rng, abstract, shardings = build_state(spec, mesh, seed)
  return init, rng, abstract, shardings, compile_step(spec, mesh, shardings)


def traced_step(spec: StageSpec, mesh, seed: int, runs: int = 0, run_axis: str | None = None):
  """The stage's train step traced on abstract arguments laid out on `mesh` (state, frozen
  tree, LM batch and hyperparameters as shapes with their shardings; `runs` > 0: a grid
  cohort of that many runs vmapped over a leading run axis placed by `run_axis`). Nothing is
  placed on a device, so `mesh` may be of compile-only devices (train/aot.py): bench lower
  and bench roofline lower and compile this."""
  _, _, abstract, shardings = build_state(spec, mesh, seed)
  frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        spec.frozen)
  step = _jitted_step(spec.loss_fn, spec.microbatches, mesh, _flat(shardings),
                      None if runs else _flat(jax.tree.map(lambda x: x.sharding, frozen)),
                      runs > 0, run_axis, one_pass_norms(spec, mesh))
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  b = spec.stage_cfg.batch_size
  batch = {k: jax.ShapeDtypeStruct((b, spec.positions_per_step // b), dtype, sharding=batch_sh)
           for k, dtype in batches.LM_DTYPES.items()}
  if runs:
    stack = lambda x, sh: jax.ShapeDtypeStruct((runs, *x.shape), x.dtype,
                                               sharding=sharding.with_run_axis(sh, run_axis))
    abstract, frozen = (jax.tree.map(lambda x: stack(x, x.sharding), t) for t in (abstract, frozen))
    batch = {k: stack(v, batch_sh) for k, v in batch.items()}
  hparams = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
             for k in optim.hyperparams(spec.stage_cfg)}
  return step.trace(abstract, frozen, batch, hparams)


def fit_runs(spec: StageSpec, mesh, seed: int, wanted: int, run_axis: str, budget: int
             ) -> tuple[int, list[tuple[int, int]]]:
  """The most runs, at most `wanted`, whose grid cohort step of `spec` (an LM stage: the
  batch of traced_step) needs at most `budget` bytes a device, and the (runs, bytes) of each
  cohort size compiled on the way (1 when even one run's step needs more: run_cohort then
  refuses it in one line). The run axis goes where grid.run_axis `run_axis` puts it for each
  size. The compile of the size returned is the one the cohort's step then runs (jax keeps
  it), so a cohort that fits costs no compile more; each size that does not costs one."""
  tried, runs = [], wanted
  while True:
    axis = sharding.run_axis_for(run_axis, mesh, runs)
    need = memory.step_bytes(traced_step(spec, mesh, seed, runs, axis).lower().compile())
    tried.append((runs, need))
    if need <= budget or runs == 1:
      return runs, tried
    runs = max(1, min(runs - 1, int(runs * budget / need)))


def check_fits(compiled, tc, mesh, label: str, spec: StageSpec, runs: int) -> None:
  """ConfigError (one line) if `compiled`, `spec`'s step for a cohort of `runs` runs (0: one
  run trained alone), needs more memory a device than train.memory_gb or the device allows
  (memory.budget_bytes); nothing when the platform does not say what a device holds."""
  budget = memory.budget_bytes(tc.memory_gb, mesh)
  need = memory.step_bytes(compiled)
  if budget is None or need <= budget:
    return
  kind = mesh.devices.flat[0].device_kind   # ("NVIDIA H200", "TPU v5 lite", "cpu")
  where = f"train.memory_gb={tc.memory_gb}" if tc.memory_gb else f"one {kind} device"
  fewer = f", or grid.max_runs below {runs}" if runs > 1 else ""
  raise ConfigError(
      f"[{label}] the {spec.name} step{f' of {runs} runs' if runs > 1 else ''} needs "
      f"{memory.gb(need)} a device, more than the {memory.gb(budget)} of {where}: "
      f"{spec.less_memory or f'lower {spec.name}.batch_size'}{fewer}")


class BoundStep:
  """A jitted `train_step(state, frozen, batch, hparams)` (step.make_train_step) with its
  stage's hyperparameters bound, called, traced and lowered as `(state, frozen, batch)`. The
  hyperparameters reach the program as (replicated) arguments, so every stage of the same
  shapes compiles to one executable (optim: pretrain -> finetune, runs of other lengths)."""

  def __init__(self, jitted, hparams):
    self.jitted, self.hparams = jitted, hparams

  def __call__(self, state, frozen, batch):
    return self.jitted(state, frozen, batch, self.hparams)

  def trace(self, state, frozen, batch):
    return self.jitted.trace(state, frozen, batch, self.hparams)

  def lower(self, state, frozen, batch):
    return self.jitted.lower(state, frozen, batch, self.hparams)


def compile_step(spec: StageSpec, mesh, shardings, runs: bool = False,
                 run_axis: str | None = None) -> BoundStep:
  """The jitted train step of `spec` on states with `shardings`; `runs`: vmapped over a
  leading run axis of state, frozen and batch (a grid cohort: the run axis replicated on the
  mesh or split over mesh axis `run_axis` (sharding.with_run_axis), every other axis sharded
  as in one run; the frozen trees as given; the hyperparameters shared)."""
  frozen_sh = None if runs else _flat(jax.tree.map(lambda x: x.sharding, spec.frozen))
  hp_sh = sharding.replicated(mesh)
  hparams = {k: jax.make_array_from_callback((), hp_sh, lambda _, v=v: v)
             for k, v in optim.hyperparams(spec.stage_cfg).items()}
  return BoundStep(_jitted_step(spec.loss_fn, spec.microbatches, mesh, _flat(shardings),
                                frozen_sh, runs, run_axis, one_pass_norms(spec, mesh)), hparams)


def one_pass_norms(spec: StageSpec, mesh) -> bool:
  """Whether the step's norms go one reduction over many leaves (optim.global_norm): off the
  CPU, where a kernel a leaf costs its launch, and where the params are whole on every device
  (mesh.fsdp = mesh.tensor = 1: concatenating leaves sharded on other dimensions gathered
  them, 30 all-gathers for 40 toy leaves on a 4-way fsdp mesh; a cohort's run axis on `data`
  is outside the vmapped norm)."""
  return spec.platform != "cpu" and mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1


def _flat(tree) -> tuple:
  """A tree of shardings as a hashable (treedef, leaves)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(leaves)


@functools.lru_cache(maxsize=16)
def _jitted_step(loss_fn, microbatches: int, mesh, state_sh, frozen_sh, runs: bool,
                 run_axis: str | None, one_pass: bool = False):
  """compile_step's jitted function, one per loss function, mesh, shardings and run layout in
  a process: the stages that train the same program reuse it (pretrain -> finetune; a grid's
  base-stage cohorts; an Experiment per row in one process), and jax's in-memory cache then
  neither traces nor compiles it again."""
  train_step = step_lib.make_train_step(loss_fn, microbatches, norm_apart=runs,
                                        one_pass_norms=one_pass)

  def step(*args):   # traced on the mesh: attention kernels run per shard (attention.on_mesh)
    with attention.on_mesh(mesh):
      return train_step(*args)

  shardings, batch_sh = jax.tree.unflatten(*state_sh), sharding.batch_sharding(mesh)
  if runs:
    def add(sh):
      return sharding.with_run_axis(sh, run_axis)
    step = jax.vmap(step, in_axes=(0, 0, 0, None))
    shardings, batch_sh = jax.tree.map(add, shardings), add(batch_sh)
  frozen = None if frozen_sh is None else jax.tree.unflatten(*frozen_sh)
  return jax.jit(step, in_shardings=(shardings, frozen, batch_sh, sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


@dataclasses.dataclass
class Member:
  """One run's share of a cohort: its stage spec, stage directory, seed and print label."""
  spec: StageSpec
  stage_dir: str
  seed: int
  label: str


def run_stage(spec: StageSpec, cfg, stage_dir: str, mesh) -> Any:
  """Train (or resume) a stage; write final/ and return the effective params."""
  return run_cohort([Member(spec, stage_dir, cfg.seed, spec.name)], cfg.train, mesh,
                    vmapped=False)[0]


def _stacked(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_runs(trees, shardings=None, run_axis: str | None = None):
  """Trees of equal structure stacked on a new leading (run) axis, placed on `shardings`'
  run-axis versions (`sharding.with_run_axis(sh, run_axis)`) when given. One jitted program
  for the whole tree: stacking leaf by leaf ran one eager op per leaf (300 for a cohort's
  state and its frozen tree): for ten `small`-sized states on 2 CPU cores 4.4-6.7 s,
  against 2.4 with this program's compile (0.2 s compiled)."""
  if shardings is None:
    return jax.jit(_stacked)(trees)
  out = jax.tree.map(lambda sh: sharding.with_run_axis(sh, run_axis), shardings)
  return jax.jit(_stacked, out_shardings=out)(trees)


@functools.partial(jax.jit, static_argnames="split")
def _take_run(tree, i, split: bool = False):
  """Run i's tree of a tree stacked on a leading run axis: one dispatch (slicing leaf by
  leaf cost a cohort of 16 toy runs seconds of dispatches), one program for every i, one
  run's copy at a time (splitting all runs at a save or eval held every copy at once).

  `split`: the run axis is split over a mesh axis (`sharding.run_axis_for`). Indexing it
  would all-gather every run's copy onto every device first (XLA's partitioning of a dynamic
  slice on a split dimension: R x one run's state in memory and on the wire); instead each
  device keeps run i's block where it holds it and zeros elsewhere, and a sum over the run
  axis (a local sum and an all-reduce of one run's size) brings it to every device. The sum
  is of the values' bits as unsigned integers (one non-zero term: exact, -0.0 and NaNs kept
  bit for bit), widened to 32 bits (collectives of 16-bit integers are not everywhere)."""
  if not split:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)

  def take(x):
    if x.dtype == jnp.bool_:
      return take(x.astype(jnp.uint32)).astype(jnp.bool_)
    raw = jnp.dtype(f"uint{x.dtype.itemsize * 8}")         # the values' bits
    wide = jnp.promote_types(raw, jnp.uint32)
    mine = (jnp.arange(x.shape[0]) == i).reshape((-1,) + (1,) * (x.ndim - 1))
    u = jnp.where(mine, jax.lax.bitcast_convert_type(x, raw).astype(wide), 0)
    return jax.lax.bitcast_convert_type(jnp.sum(u, axis=0, dtype=wide).astype(raw), x.dtype)

  return jax.tree.map(take, tree)


def heap_bound(mesh) -> heap.Bound:
  """The retained heap's bound (heap.Bound) for train steps on `mesh`: the loop's, and the
  one `throughput.timed_steps` measures steps with."""
  return heap.Bound(kstore_jax.RETAINS_FREED_MEMORY, heap.steps_inline(mesh.devices.size))


def run_cohort(members: list[Member], tc, mesh, vmapped: bool = True,
               run_axis: str | None = None) -> list:
  """Train (or resume) the same stage of several runs together; write each one's final/ and
  return their effective params.

  The members share the stage's model shape, schedule, step count and batch shape (their
  specs' loss and optimizer are the same function; member 0's is compiled), and differ in
  data, initial params and frozen trees. `vmapped`: one jitted step over states stacked on a
  leading run axis (the grid), replicated or split over mesh axis `run_axis`
  (`sharding.run_axis_for`); otherwise a single member trains with the plain step (main).
  Each member keeps its own checkpoints (its state slice and its Grain iterator), metrics and
  final/, exactly as a run trained alone writes them. Members resumed at different steps
  (a kill between their saves) first bring the ones behind up to the others, in steps of the
  whole cohort: a vmapped step's numbers depend on the run count, so a resumed grid repeats
  an uninterrupted one's exactly only with the same count.
  """
  if not vmapped and len(members) != 1:
    raise ValueError("an unvmapped cohort has exactly one member")
  t_enter = time.time()
  # where the stage's wall time went, for its "done" line: before the first step (inits or
  # restores, stacking, the first batches), the first step (its compile), saves and evals
  clock = dict(setup=None, first=0.0, paused=0.0)
  save_clock = _SaveClock(tc.save_minutes)
  spec0 = members[0].spec
  sc = spec0.stage_cfg
  is_main = jax.process_index() == 0
  init, _, abstract, shardings = build_state(spec0, mesh, members[0].seed)   # one for all
  step_fn = compile_step(spec0, mesh, shardings, runs=vmapped, run_axis=run_axis)
  split = run_axis is not None   # (_take_run)
  data_iters, ckpts, writers, states, starts = [], [], [], [], []
  for m in members:
    os.makedirs(m.stage_dir, exist_ok=True)
    data_iters.append(iter(m.spec.data(jax.process_index(), jax.process_count())))
    ckpts.append(checkpoint.Checkpointer(rundir.checkpoints_dir(m.stage_dir),
                                         tc.keep_checkpoints))
    start, state = ckpts[-1].restore_latest(
        checkpoint.abstract_with_shardings(abstract, shardings), data_iters[-1])
    if state is None:
      state = init(jax.random.PRNGKey(m.seed), m.spec.init_args)
    elif is_main:
      print(f"[{m.label}] resumed from step {start}", flush=True)
    states.append(state)
    starts.append(start)
    writers.append(metrics_lib.MetricsWriter(m.stage_dir, start, enabled=is_main))
  peak = device_peak_flops(spec0.dtype)
  bound = heap_bound(mesh)   # CPU: freed memory kept, bounded

  diverged = {}   # member index -> its non-finite message (a vmapped cohort's; see check)

  def diverged_error() -> NonFiniteLoss:
    return NonFiniteLoss("; ".join(diverged.values()), [members[i].label for i in diverged])

  def check(active, step, device_metrics) -> dict:
    """The metrics of `step` of each member in `active`, fetched ({i: {name: float}}). A
    member whose metrics are not finite leaves `active` (in a vmapped cohort it rides along,
    unsaved, as members ahead do, and the others train on); NonFiniteLoss once no member is
    left. The step's param_norm is of the params it made, so a step that passes leaves a
    state fit to save."""
    values = jax.device_get(device_metrics)
    rows = {}
    for i in list(active):
      row = {k: float(v[i] if vmapped else v) for k, v in values.items()}
      if all(math.isfinite(v) for v in row.values()):
        rows[i] = row
        continue
      bad = ", ".join(k for k, v in row.items() if not math.isfinite(v))
      diverged[i] = (f"[{members[i].label}] non-finite {bad} at step {step} "
                     f"(loss={row['loss']}); its checkpoints, if any, are kept")
      active.remove(i)
      if len(diverged) < len(members):
        print(f"{diverged[i]}; the cohort's other runs go on", file=sys.stderr, flush=True)
    if len(diverged) == len(members):
      raise diverged_error()
    return rows

  # a vmapped cohort's step trains every member, those ahead riding along (train below)
  cohort_flops = sum(m.spec.positions_per_step * m.spec.flops_per_position for m in members)

  def log(active, step, device_metrics, t_last, step_last):
    """Each member's row: its own tokens/s, FLOP/s and MFU (in a cohort of R runs its share
    of the device, ~1/R of the step's); a vmapped cohort's rows add the whole step's
    (`cohort_flops_per_s`, `cohort_mfu`: what the device did)."""
    rows = check(active, step, device_metrics)
    now = time.time()
    timed = step - step_last   # steps in the window (0: the first step, its compile untimed)
    steps_per_s = timed / max(now - t_last, 1e-9)
    for i, row in rows.items():
      m = members[i]
      tps = steps_per_s * m.spec.positions_per_step
      if timed:
        row.update(tokens_per_s=tps, step_time_s=m.spec.positions_per_step / max(tps, 1e-9),
                   flops_per_s=tps * m.spec.flops_per_position)
        if vmapped:
          row.update(cohort_runs=len(members), cohort_flops_per_s=steps_per_s * cohort_flops)
        if peak:
          row["mfu"] = row["flops_per_s"] / peak
          if vmapped:
            row["cohort_mfu"] = row["cohort_flops_per_s"] / peak
      writers[i].write(step, row)
      if is_main:
        speed = (f"{tps / 1e3:.1f}k tok/s ETA {_fmt_time((sc.steps - step) * row['step_time_s'])}"
                 if timed else "(compiled)")
        print(f"[{m.label}] step {step}/{sc.steps} loss {row['loss']:.4f} "
              f"lr {row['lr']:.2e} {speed}", flush=True)
    return now, step

  frozen = (stack_runs([m.spec.frozen for m in members]) if vmapped else members[0].spec.frozen)
  # Several processes: orbax's save barriers are named without the checkpoint directory, so
  # two members' background saves in flight at once collide ("barrier already ongoing");
  # each member's save completes before the next one's starts.
  serial_saves = len(members) > 1 and jax.process_count() > 1

  def train(state, active, start, stop, signals):
    """Steps [start, stop) of the members `active` (indices); the others (members ahead,
    while those behind catch up) ride along on a borrowed batch and their slices are
    discarded by the caller, so the step is always the full cohort's (the same program, so
    the same numbers, as an uninterrupted grid's)."""
    pending = None   # (step, device metrics) fetched one step behind
    t_last, step_last = time.time(), start
    step = start
    while step < stop:
      rows = {i: next(data_iters[i]) for i in active}
      if vmapped:
        batch = sharding.to_global_stacked(
            [rows.get(i, rows[active[0]]) for i in range(len(members))], mesh, run_axis)
      else:
        batch = sharding.to_global(rows[0], mesh)
      profiler.step(step, state)   # train.profile_steps: a trace of that window
      t_step = time.time()
      if clock["setup"] is None:   # compiled here first (the call below reuses it): a step
        # that cannot fit a device is refused before it runs, in one line, nothing saved
        check_fits(step_fn.lower(state, frozen, batch).compile(), tc, mesh, members[0].label,
                   spec0, len(members) if vmapped else 0)
      state, device_metrics = step_fn(state, frozen, batch)
      if step == start:   # the heap bound measures a completed step's working set
        jax.block_until_ready(device_metrics)
        # tokens/s and MFU are of trained steps: the first one's compile is not in the window
        t_last, step_last = time.time(), start + 1
        if clock["setup"] is None:
          clock["setup"], clock["first"] = t_step - t_enter, t_last - t_step
          if is_main:   # (a run stopped before its "done" line still says where it began)
            who = members[0].label + (f" and {len(members) - 1} more" if len(members) > 1
                                      else "")
            print(f"[{who}] step {start + 1}: {clock['first']:.1f} s with its compile, "
                  f"{clock['setup']:.1f} s before it", flush=True)
      bound.after_step()
      step += 1
      if pending is not None:
        t_last, step_last = log(active, *pending, t_last, step_last)
        pending = None
      if step % tc.log_every == 0 or step == sc.steps:
        pending = (step, device_metrics)
      # read once: a signal that comes during this step's eval or save stops the next one
      # (read twice, one during the eval stopped here unsaved, "checkpoint saved" all the same)
      counted = step % tc.save_every == 0 or step == sc.steps
      caught, late = signals.agreed(counted or step % tc.log_every == 0, save_clock.late())
      boundary = counted or late or caught
      if boundary:   # never save unchecked, whatever log_every: the saved step's own metrics
        if pending is not None:   # this step's, logged now
          t_last, step_last = log(active, *pending, t_last, step_last)
          pending = None
        else:
          check(active, step, device_metrics)
      evaluate = tc.eval_every and step % tc.eval_every == 0
      if evaluate and not boundary:   # (a boundary fetched the step's metrics: it is done)
        jax.block_until_ready(device_metrics)   # the step's own time stays in the window
      t_pause = time.time()   # eval and saves are kept out of the throughput window
      for i in active:
        m = members[i]
        if not (boundary or (evaluate and m.spec.eval_fn)):
          continue
        # one member's state, cut from the cohort's once (its params alone for an eval
        # without a save)
        own = ((lambda tree, i=i: _take_run(tree, i, split)) if vmapped else
               (lambda tree: tree))
        one = own(state) if boundary else {"params": own(state["params"])}
        # the eval row first: a run killed during the eval resumes before this step and
        # evaluates it again; once the step is saved, a resume never would
        if evaluate and m.spec.eval_fn:
          writers[i].write(step, m.spec.eval_fn(m.spec.export(one["params"], m.spec.frozen)))
        if boundary:
          ckpts[i].save(step, one, data_iters[i])
          if serial_saves:
            ckpts[i].wait()
      if boundary:
        save_clock.saved()
      paused = time.time() - t_pause
      t_last += paused
      clock["paused"] += paused
      if caught:
        for i in active:
          ckpts[i].wait()
        raise Interrupted(f"[{', '.join(members[i].label for i in active)}] "
                          f"{caught} at step {step}; checkpoint saved")
      if not active:   # the members this call trained diverged (a catch-up's): others go on
        return state
    if pending is not None:   # a catch-up's last step, not a save step: logged all the same
      log(active, *pending, t_last, step_last)
    return state

  # one trace per cohort (of its one step), in the first member's stage directory
  profiler = profiling.StepProfiler(members[0].stage_dir, tc.profile_steps)
  try:
    with _Signals() as signals, profiler:
      live = lambda: [i for i in range(len(members)) if i not in diverged]
      while len({starts[i] for i in live()}) > 1:   # the members behind up to the next one
        low = min(starts[i] for i in live())
        ahead = min(starts[i] for i in live() if starts[i] > low)
        active = [i for i in live() if starts[i] == low]
        trained = train(stack_runs(states, shardings, run_axis), active, low, ahead, signals)
        for i in active:
          states[i], starts[i] = _take_run(trained, i, split), ahead
        del trained
      state = stack_runs(states, shardings, run_axis) if vmapped else states[0]
      states.clear()   # (stacked: the members' own copies are not needed again)
      state = train(state, live(), starts[live()[0]], sc.steps, signals)
  finally:
    for c in ckpts:
      c.close()
    for w in writers:
      w.close()
  timing = ("no step left to train" if clock["setup"] is None else
            f"{clock['setup']:.1f} s before the first step, {clock['first']:.1f} s in it "
            f"with its compile, {clock['paused']:.1f} s in saves and evals")
  out = []
  for i, m in enumerate(members):
    if i in diverged:
      continue
    final = _take_run(state["params"], i, split) if vmapped else state["params"]
    params = m.spec.export(final, m.spec.frozen)
    checkpoint.save_params(rundir.final_dir(m.stage_dir), params)
    out.append(params)
    if is_main:
      print(f"[{m.label}] done: {sc.steps} steps in {_fmt_time(time.time() - t_enter)} "
            f"({timing})", file=sys.stdout, flush=True)
  if diverged:   # the others are trained and saved: say which did not
    raise diverged_error()
  return out
