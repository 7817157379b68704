"""Run a grid of experiments: `python -m kstore_jax.grid --config=configs/grids/<grid>.py[:scale]
--workdir=DIR [--runs=a,b] [--config.<key>=<value> ...]`.

A grid config (configs/grids/__init__.py) lists runs by name; each run's directory DIR/<run>/
is exactly what `python -m kstore_jax.main` writes for that run's config (so `report`,
`inspect`, `ask` and `main` work on it alone), and DIR/grid.json records the grid (its runs
in order, each one's data row and training method, the config spec and overrides).
`--config.grid.<key>=<value>` sets the grid section; every other `--config.<key>=<value>`
applies to every run. All runs are validated before anything is written (a bad one is a
one-line error naming the run and the key).

`grid.mode`:
  vmap        the runs' stages train in cohorts: runs whose stage has the same model shape,
              stage settings, batch shape and loss train in one jitted step vmapped over a
              leading run axis of params, optimizer state and batches (`grid.max_runs` per
              cohort; pretrain and pretrain_mixed, the same loss from scratch on other data,
              share cohorts), each fed by its own Grain iterator and checkpointed into its own
              directory. `grid.run_axis` places the run axis on the mesh: `replicated`
              (the default: each run's rows split over data x fsdp as when it trains
              alone) or `data` (whole runs per slice of the data axis, so no gradient
              all-reduce across it, where the axis divides the cohort; else replicated).
              `grid.eval_runs`: the eval stage of runs that ask the same questions of the
              same model shape decodes in one pass vmapped over their params (`together`,
              `grid.max_runs` at a time; `auto`: on a GPU/TPU, not on a CPU, where it
              measured slower) or run by run (`alone`); probe scoring runs per run.
              `grid.precompile`: while a stage trains, a background thread compiles the
              steps of the runs' next trained stage (`compile_ahead`: a finetune's cohort
              during pretraining), so that stage starts on jax's cached executables (`on`;
              `auto`: on a GPU/TPU, one process; `off`).
  processes   each run in its own `python -m kstore_jax.grid --runs=<run>` process pinned
              to one CPU core, as many at once as there are cores (2 cores: two runs side by
              side).
  sequential  the runs one after another in this process, as `main` would run them.
  auto        vmap on a GPU/TPU; on a CPU, processes when there are several runs and cores,
              else sequential (BENCHMARKS.md "Grid": a vmapped step gains nothing on 2 cores).
A rerun resumes every run where it stopped (finished stages are skipped, interrupted ones
resume from their checkpoints); kill -9 safe like `main`.
"""

import os
import signal
import subprocess
import sys
import threading
import time

from absl import flags

from configs import base
from kstore_jax import configlib, rundir
from kstore_jax.configlib import ConfigError
from kstore_jax.tools import cli, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Grid directory: one subdirectory per run.")
_RUNS = flags.DEFINE_list("runs", None, "Only these runs of the grid (default: all).")

_ARGS = {}   # the --config spec and its overrides, taken off argv before absl parses it


def method(cfg) -> str:
  """The run's QA training as the report names it (configs/base.py qa_method)."""
  return base.qa_method(configlib.stage_list(cfg))


def open_runs(g, names: list[str], workdir: str, platform: str, n_devices: int) -> dict:
  """{run: (Experiment, tokenizer)} for `names`, every run checked, nothing written."""
  from kstore_jax import experiment
  out = {}
  for name in names:
    try:
      out[name] = experiment.open_experiment(g.runs[name], os.path.join(workdir, name),
                                             n_devices, platform)
    except (FileNotFoundError, ValueError) as e:   # ConfigError, or a bad input file
      raise ConfigError(f"run {name!r}: {e}") from None
  return out


def resolve_mode(mode: str, platform: str, n_runs: int, n_processes: int = 1) -> str:
  """grid.mode as run: `auto` is vmap off a CPU and in a multi-process cluster (a child
  process would rejoin the cluster under its parent's id), else processes or sequential."""
  if n_processes > 1:
    if mode == "processes":
      raise ConfigError("grid.mode=processes: a grid of several JAX processes runs its runs "
                        "in them (vmap or sequential), not in child processes")
    return "vmap" if mode == "auto" else mode
  if mode != "auto":
    return mode
  if platform != "cpu":
    return "vmap"
  return "processes" if n_runs > 1 and len(os.sched_getaffinity(0)) > 1 else "sequential"


def plan_cohorts(exps: dict, stages: dict[str, str], say_done: bool = False
                 ) -> dict[tuple, tuple[list[str], object]]:
  """{cohort key: (runs, the first run's member, abstract)} of the runs in `stages` (run ->
  the trained stage it trains next) that have not finished it: runs of one key train in one
  step (Experiment.member). Keyed on shapes: a run's base model (finetune, probes) is loaded
  when its cohort trains, not every run's at once."""
  cohorts: dict[tuple, tuple[list[str], object]] = {}
  for n, stage in stages.items():
    if exps[n].done(stage):
      if say_done:
        print(f"[{n}/{stage}] already done, skipping", flush=True)
      continue
    member, key = exps[n].member(stage, n, abstract=True)
    cohorts.setdefault(key, ([], member))[0].append(n)
  return cohorts


def compile_ahead(exps: dict, cohorts: dict, max_runs: int, run_axis: str) -> threading.Thread:
  """A started background thread compiling the steps `cohorts` (plan_cohorts of LM stages,
  base.TRAIN_STAGES) will train, at the sizes train_vmapped cuts them to (cohort_parts; the
  memory fit compiles the sizes it tries): when their stage starts, its compiles are jax's
  in-memory cache's. A step that fails to compile here says
  so in a line and compiles, and fails, when its stage starts."""
  from kstore_jax.train import loop, sharding

  def work():
    for group, member in cohorts.values():
      exp = exps[group[0]]
      try:
        parts = cohort_parts(exp, member, group, max_runs, run_axis, quiet=True)
        for runs in sorted({len(p) for p in parts}):
          axis = sharding.run_axis_for(run_axis, exp.mesh, runs)
          loop.traced_step(member.spec, exp.mesh, exp.cfg.seed, runs, axis).lower().compile()
      except Exception as e:   # noqa: BLE001 - compiled again, and raised, when it trains
        print(f"[grid] compiling {member.spec.name} ahead failed ({type(e).__name__}: "
              f"{str(e)[:200]}); it compiles when its stage starts", file=sys.stderr,
              flush=True)

  thread = threading.Thread(target=work, name="compile_ahead")
  thread.stages = ", ".join(dict.fromkeys(m.spec.name for _, m in cohorts.values()))
  thread.start()
  return thread


def finish_ahead(thread: threading.Thread) -> None:
  """Wait for compile_ahead's thread; a line says how long this stage waited for it."""
  t = time.time()
  thread.join()
  print(f"[grid] {thread.stages}: compiled ahead ({time.time() - t:.1f} s waited)", flush=True)


def train_vmapped(exps: dict, max_runs: int, run_axis: str = "replicated",
                  eval_together: bool = False, precompile: bool = False) -> None:
  """Every run's stages, the training and probe-training ones in cohorts (Experiment.member
  keys) of at most `max_runs` runs, each stage of all runs before the next stage (the base
  stages as one: a pretrain and a pretrain_mixed of equal settings share a step); a cohort's
  run axis placed on the mesh by `run_axis` (grid.run_axis: sharding.run_axis_for); with
  `eval_together` the eval of runs with one Experiment.eval_key decoded in one pass; with
  `precompile` the steps of each run's next trained stage compiled in the background while
  a stage trains (compile_ahead)."""
  from configs import base
  from kstore_jax import experiment
  from kstore_jax.train import loop, sharding
  pending = {n: list(e.stages()) for n, e in exps.items()}
  diverged = []   # runs whose loss went non-finite: their later stages are skipped
  ahead = None    # the background compile of the next trained stage's steps
  try:
    while any(pending.values()):
      nexts = {n: s[0] for n, s in pending.items() if s}
      stage = min(set(nexts.values()), key=base.STAGE_NAMES.index)
      # the stages of its step group go together (pretrain beside pretrain_mixed)
      names = [n for n, s in nexts.items() if base.step_group(s) == base.step_group(stage)]
      cohorts = {}
      if stage in base.TRAINED_STAGES:
        if ahead is not None:   # (an eval before this stage ran beside it)
          finish_ahead(ahead)
          ahead = None
        cohorts = plan_cohorts(exps, {n: nexts[n] for n in names}, say_done=True)
        if precompile and cohorts:   # each of these runs' next LM stage, if it has one
          after = {n: s for n in names if (s := next(
              (t for t in pending[n][1:] if t in base.TRAINED_STAGES), None))
              and s in base.TRAIN_STAGES}
          if upcoming := plan_cohorts(exps, after):   # (none: those stages are done)
            ahead = compile_ahead(exps, upcoming, max_runs, run_axis)
      for group, member in cohorts.values():
        for part in cohort_parts(exps[group[0]], member, group, max_runs, run_axis):
          first = exps[part[0]]
          axis = sharding.run_axis_for(run_axis, first.mesh, len(part))
          stages = ", ".join(dict.fromkeys(nexts[n] for n in part))
          print(f"[grid] {stages}: {len(part)} run(s) in one step (run axis "
                f"{axis or 'replicated'}): {', '.join(part)}", flush=True)
          labels = {n: f"{n}/{nexts[n]}" for n in part}   # (the stages of one step group)
          members = [exps[n].member(nexts[n], labels[n])[0] for n in part]
          try:
            loop.run_cohort(members, first.cfg.train, first.mesh, run_axis=axis)
          except loop.NonFiniteLoss as e:   # the cohort's other runs are trained and saved
            print(f"kstore_jax.grid: {e}", file=sys.stderr, flush=True)
            diverged += [n for n in part if labels[n] in e.members]
          del members   # (their base params: the next cohort loads its own)
      together = (eval_cohorts(exps, names, max_runs)
                  if eval_together and base.STAGE_KINDS[stage] == "eval" else [])
      for part in together:
        print(f"[grid] {stage}: {len(part)} run(s) decoded together: {', '.join(part)}",
              flush=True)
        experiment.evaluate_runs([exps[n] for n in part])
      evaluated = {n for part in together for n in part}
      for n in names:
        if n in diverged:
          pending[n] = []
          continue
        if stage not in base.TRAIN_STAGES and n not in evaluated:
          print(f"== {n}: {stage} ==", flush=True)   # probe scoring (trained above) or eval
          exps[n].run_stage(stage)
        pending[n].pop(0)
  finally:   # a thread cut off mid-compile at exit can crash the interpreter's shutdown
    if ahead is not None:   # (a stage no run reached: its runs diverged; or an error)
      ahead.join()
  if diverged:
    raise loop.NonFiniteLoss(f"run(s) {', '.join(diverged)} stopped on a non-finite loss; "
                             "every other run finished", diverged)


def cohort_parts(exp, member, group: list[str], max_runs: int, run_axis: str,
                 quiet: bool = False) -> list[list[str]]:
  """`group`'s runs (a plan_cohorts key's: `member` the first one's) in the parts that train
  one step each: at most `max_runs` runs, and for an LM stage no more than fit a device
  (fit_cohort; probe steps are small)."""
  from configs import base
  size = min(max_runs, len(group))
  if size > 1 and member.spec.name in base.TRAIN_STAGES:
    size = fit_cohort(exp, member, size, run_axis, quiet)
  return [group[i:i + size] for i in range(0, len(group), size)]


def fit_cohort(exp, member, wanted: int, run_axis: str, quiet: bool = False) -> int:
  """The most runs, at most `wanted`, that `member`'s stage trains in one step within
  memory.FIT_SHARE of what a device may hold (train.memory_gb or the device's:
  loop.fit_runs); `wanted` where the platform does not say. A line says what each size
  needed when fewer fit (not `quiet`: compile_ahead's, said again when the stage starts)."""
  from kstore_jax.train import loop, memory
  budget = memory.budget_bytes(exp.cfg.train.memory_gb, exp.mesh)
  if budget is None:
    return wanted
  allowed = int(budget * memory.FIT_SHARE)
  runs, tried = loop.fit_runs(member.spec, exp.mesh, exp.cfg.seed, wanted, run_axis, allowed)
  if runs < wanted and not quiet:
    needs = ", ".join(f"{r} run{'s' * (r > 1)}: {memory.gb(b)}" for r, b in tried)
    print(f"[grid] {member.spec.name}: a step's memory a device ({needs}) against "
          f"{memory.gb(allowed)} ({int(memory.FIT_SHARE * 100)}% of "
          f"{memory.gb(budget)}): {runs} run(s) a step", flush=True)
  return runs


def eval_cohorts(exps: dict, names: list[str], max_runs: int) -> list[list[str]]:
  """The runs among `names` whose eval can decode in one vmapped pass (equal
  Experiment.eval_key: the same model shape and questions), in parts of at most `max_runs`;
  a run with no partner is left out (it evaluates alone)."""
  by_key: dict[tuple, list] = {}
  for n in names:
    by_key.setdefault(exps[n].eval_key(), []).append(n)
  return [part for group in by_key.values() for i in range(0, len(group), max_runs)
          if len(part := group[i:i + max_runs]) > 1]


def eval_together(choice: str, platform: str) -> bool:
  """grid.eval_runs: `together`, or `auto` off a CPU (on 2 CPU cores one vmapped decode of R
  runs took 1.2-1.5x their decodes one after another: BENCHMARKS.md "Grid")."""
  return choice == "together" or (choice == "auto" and platform != "cpu")


def compile_ahead_on(choice: str, platform: str, n_processes: int) -> bool:
  """grid.precompile: `on`, or `auto` off a CPU (there the host waits on the device while a
  step runs; on a CPU a compile takes the cores the step runs on); never in a cluster of
  several processes (the cohort sizes are agreed on by a collective: memory.budget_bytes)."""
  if n_processes > 1:
    return False
  return choice == "on" or (choice == "auto" and platform != "cpu")


def run_processes(spec: str, overrides: list[str], workdir: str, names: list[str]) -> None:
  """Each run in its own grid process (`--runs=<run>`, sequential mode) pinned to one core,
  one per core at a time; their output lines prefixed with the run's name."""
  cores = sorted(os.sched_getaffinity(0))
  queue = list(names)
  failed, running, stopped = [], set(), []
  lock = threading.Lock()

  def worker(core: int) -> None:
    while True:
      with lock:
        if not queue:
          return
        name = queue.pop(0)
      cmd = [sys.executable, "-m", "kstore_jax.grid", f"--config={spec}",
             f"--workdir={workdir}", f"--runs={name}", "--config.grid.mode=sequential",
             *[f"--config.{o}" for o in overrides if not o.startswith("grid.mode=")]]
      # the child pins itself (no fork) and dies with this process (runtime.die_with_parent)
      env = {**os.environ, runtime.PIN_CORE: str(core), runtime.PARENT: str(os.getpid())}
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
      with lock:
        running.add(proc)
        if stopped:   # a signal came while it started
          proc.terminate()
      for line in proc.stdout:
        print(f"[{name}] {line}", end="", flush=True)
      rc = proc.wait()
      with lock:
        running.discard(proc)
        if rc != 0:
          failed.append((name, rc))

  def stop(signum, _frame) -> None:
    """SIGTERM / SIGINT: every running child saves where it is (SIGTERM), none starts."""
    with lock:
      stopped.append(signum)
      queue.clear()
      for proc in running:
        proc.terminate()

  handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  threads = [threading.Thread(target=worker, args=(c,)) for c in cores[:len(names)]]
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    for s, h in handlers.items():
      signal.signal(s, h)
  if stopped:
    print(f"kstore_jax.grid: stopped by signal {stopped[0]}: the runs saved where they were; "
          "rerun the same command to resume", file=sys.stderr)
    sys.exit(1)
  if failed:
    print("kstore_jax.grid: " + "; ".join(f"run {n!r} failed (exit {rc})" for n, rc in failed),
          file=sys.stderr)
    sys.exit(1)


def write_grid_file(workdir: str, g, spec: str, overrides: list[str]) -> None:
  """DIR/grid.json: the runs in order with their data row and method (the report reads it,
  also for runs that have not started), the spec and the overrides."""
  os.makedirs(workdir, exist_ok=True)
  record = {"config": spec, "overrides": overrides, "grid": g.grid.to_dict(),
            "runs": [{"name": n, "row": g.runs[n].name, "method": method(g.runs[n])}
                     for n in g.order]}
  rundir.write_json(os.path.join(workdir, rundir.GRID), record, sort_keys=False)


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument {argv[1]!r}")
  if not _WORKDIR.value:
    raise ConfigError("--workdir is required")
  spec, overrides = _ARGS["spec"], _ARGS["overrides"]
  g = configlib.load_grid(spec, overrides)
  names = list(g.order)
  if _RUNS.value is not None:   # `--runs=` (an empty variable, say) names none: not "all"
    if not _RUNS.value:
      raise ConfigError(f"--runs= names no run (the grid's: {', '.join(names)})")
    unknown = [n for n in _RUNS.value if n not in g.runs]
    if unknown:
      raise ConfigError(f"--runs: {unknown[0]!r} is not a run of the grid ({', '.join(names)})")
    names = [n for n in names if n in _RUNS.value]
  rundir.check_workdir(_WORKDIR.value, holds="grid")
  workdir = os.path.abspath(_WORKDIR.value)
  runtime.maybe_initialize_distributed()
  import jax
  from kstore_jax.model import attention
  platform = attention.platform_of(jax.devices())
  opened = open_runs(g, names, workdir, platform, jax.device_count())
  mode = resolve_mode(g.grid.mode, platform, len(names), jax.process_count())
  for exp, _ in opened.values():   # every run locked before anything is written (grid.json
    exp.workdir.lock()             # too: a second grid on a running one changes nothing)
  # one writer per cluster, as for every run file (--runs too: the report lists the runs not
  # yet run); a processes-mode child's parent wrote it with the grid's own mode and overrides
  if jax.process_index() == 0 and not runtime.is_grid_child():
    write_grid_file(workdir, g, spec, overrides)
  print(f"[grid] {len(names)} run(s), mode {mode}: {', '.join(names)}", flush=True)
  if mode == "processes":   # each child locks its own run, and holds it while it saves
    for exp, _ in opened.values():   # after this process dies (runtime.die_with_parent)
      exp.workdir.unlock()
    run_processes(spec, overrides, workdir, names)
    return
  runtime.use_compile_cache(g.runs[names[0]].train.compile_cache)
  for exp, tok in opened.values():
    exp.start(tok)
  exps = {n: e for n, (e, _) in opened.items()}
  from kstore_jax.train import loop
  try:
    if mode == "vmap":
      train_vmapped(exps, g.grid.max_runs, g.grid.run_axis,
                    eval_together=eval_together(g.grid.eval_runs, platform),
                    precompile=compile_ahead_on(g.grid.precompile, platform,
                                                jax.process_count()))
    else:   # a run that diverges stops alone (as a processes-mode child does)
      diverged = []
      for n, e in exps.items():
        print(f"== {n} ==", flush=True)
        try:
          e.run()
        except loop.NonFiniteLoss as err:
          print(f"kstore_jax.grid: {err}", file=sys.stderr, flush=True)
          diverged.append(n)
      if diverged:
        sys.exit(1)
  except (loop.NonFiniteLoss, loop.Interrupted) as e:   # a vmap cohort stops as one
    print(f"kstore_jax.grid: {e}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
  """`python -m kstore_jax.grid` (the shim kstore_jax/grid.py calls this)."""
  runtime.prepare_process()   # CPU: malloc on 2 MiB pages, steps run inline (heap.py)
  runtime.pin_to_core_from_env()
  sys.argv, _ARGS["spec"], _ARGS["overrides"] = configlib.split_config_args(sys.argv)
  cli.run(main, "kstore_jax.grid", config_required=False)
