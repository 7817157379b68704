"""Benchmarks: `python -m kstore_jax.bench <what> [--config=...]`.

    python -m kstore_jax.bench data --config=configs/tiny.py [--workers=0,2] [--imported=jsonl,tfds]
    python -m kstore_jax.bench population --n=10000000
    python -m kstore_jax.bench startup [--startup_repeats=3]
    python -m kstore_jax.bench eval --config=configs/tiny.py [--workdir=DIR] [--eval_people=200]
    python -m kstore_jax.bench probe --config=configs/tiny.py [--probe_steps=20]
    python -m kstore_jax.bench train --config=configs/base.py:small [--gpt2_vocab]
    python -m kstore_jax.bench attention --config=configs/base.py [--attention=xla,pallas]
    python -m kstore_jax.bench ceiling [--matmul_n=2048] [--copy_bytes=268435456]
    python -m kstore_jax.bench lower --config=configs/base.py --platform=cuda|tpu
    bash launch/aot_plugin.sh roofline --config=configs/base.py:small [--cohort_runs=10]
    python -m kstore_jax.bench grid --config=configs/grids/demo.py:tiny [--runs=2,4,8]

Each measurement is printed as one JSON line `{"name", "value", "unit", ...context}`, all of
them at the end of the output. A benchmark is a function `fn(cfg) -> list[dict]` in BENCHMARKS
(cfg is the validated `--config`, or None for those in NO_CONFIG).
"""

import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from absl import flags

import kstore_jax
from configs.base import PROBE_STAGES, TRAIN_STAGES, size_name
from kstore_jax import configlib, heap, rundir
from kstore_jax.tools import cli, runtime

CONFIG = cli.config_flag()
WORKERS = flags.DEFINE_list("workers", ["0", "2"], "data: Grain worker processes to compare")
IMPORTED = flags.DEFINE_list("imported", [], "data: also time the config's world exported in "
                             "these formats (jsonl, tfds) and read back through data.source")
WARMUP = flags.DEFINE_integer("warmup", 5, "data: batches taken before timing starts",
                              lower_bound=0)
MIN_SECONDS = flags.DEFINE_float("min_seconds", 3.0, "data: time at least this long ...",
                                 lower_bound=0)
MIN_BATCHES = flags.DEFINE_integer("min_batches", 200, "data: ... and at least this many batches",
                                   lower_bound=0)
MAX_SECONDS = flags.DEFINE_float("max_seconds", 60.0, "data: but stop after this long",
                                 lower_bound=0)
TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "train: timed steps (after 2 warm-up)",
                                   lower_bound=1)
N_PEOPLE = flags.DEFINE_integer("n", 10_000_000, "population: number of people (at most half "
                                "the name space)", lower_bound=1)
EVAL_PEOPLE = flags.DEFINE_integer("eval_people", 0, "eval: people whose 6 QA prompts are "
                                   "answered, held-out half first (0 = those the eval stage "
                                   "answers: both halves, eval.max_people of each)",
                                   lower_bound=0)
EVAL_BATCH = flags.DEFINE_integer("eval_batch", 0, "eval: questions per batch (0 = the "
                                  "config's eval.batch_size)", lower_bound=0)
EVAL_REPEATS = flags.DEFINE_integer("eval_repeats", 3, "eval: timed runs of each, interleaved "
                                    "(the median counts)", lower_bound=1)
EVAL_MAX_NEW = flags.DEFINE_integer("eval_max_new", 0, "eval: tokens to generate (0 = the "
                                    "longest answer + EOT, as in QA eval)", lower_bound=0)
PROBE_STEPS = flags.DEFINE_integer("probe_steps", 20, "probe: timed steps per probe (after 2 "
                                   "warm-up)", lower_bound=1)
COHORT_RUNS = flags.DEFINE_integer("cohort_runs", 0, "train, profile: the step of a grid cohort "
                                   "of this many runs vmapped together (0: one run's plain "
                                   "step); tokens/s, FLOP/s and MFU are the cohort's",
                                   lower_bound=0)
GPT2_VOCAB = flags.DEFINE_bool("gpt2_vocab", False, "train: the model with GPT-2's 50,304-token "
                                "output head (comparable with 124M-parameter GPT-2 figures)")
ATTENTION = flags.DEFINE_list("attention", [], "attention: implementations to time (default: "
                              "every one that runs on this platform)")
PLATFORM = flags.DEFINE_enum("platform", "cuda", ["cpu", "cuda", "rocm", "tpu"],
                             "lower: the platform to lower for")
PROFILE_TOP = flags.DEFINE_integer("profile_top", 25, "profile, roofline: ops listed (most "
                                   "time first)", lower_bound=1)
ROOFLINE_TARGET = flags.DEFINE_string("target", "h200", "roofline: what to compile for, a GPU "
                                      "(train/aot.py TARGETS: h200, h100) or a TPU slice "
                                      "(TPU_TARGETS: v4:2x2x1, v5e:2x2, v5p:2x2x1, v6e:2x2)")
ROOFLINE_DEVICES = flags.DEFINE_integer("devices", 1, "roofline: GPUs of one host the config's "
                                        "mesh spans (a TPU target: its slice's); the floor is "
                                        "one device's, collectives counted at memory "
                                        "bandwidth: a lower bound", lower_bound=1)
MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "ceiling, train: the reference n x n x n matmul's n "
                                "(0: 2048 on a CPU, 8192 on an accelerator)", lower_bound=0)
COPY_BYTES = flags.DEFINE_integer("copy_bytes", 0, "ceiling: the copied buffer's bytes (0: 256 MiB "
                                  "on a CPU, 4 GiB on an accelerator)", lower_bound=0)
ATTENTION_SWEEP = flags.DEFINE_bool("attention_sweep", True, "attention: pallas_docs also at "
                                    "other launches (pallas_docs_launches) beside the model's")
ATTENTION_REPEATS = flags.DEFINE_integer("attention_repeats", 20, "attention: timed calls each",
                                         lower_bound=1)
WORKDIR = flags.DEFINE_string("workdir", None, "eval: a run directory whose finished training "
                              "stage's final params are used (default: a random model)")
GRID_RUNS = flags.DEFINE_list("runs", ["2", "4", "8"], "grid: run counts R to time (the "
                              "grid's runs repeated up to R)")
GRID_MODES = flags.DEFINE_list("grid_modes", ["vmap", "processes"], "grid: the grid modes "
                               "timed against the runs one after another")
GRID_ALONE = flags.DEFINE_list("grid_alone", [], "grid: (internal) time these runs one "
                               "after another and print the sum (a processes-mode child)")
GRID_BARRIER = flags.DEFINE_string("grid_barrier", "", "grid: (internal) a processes-mode "
                                   "child's barrier directory: `ready.<pid>` when warmed up, "
                                   "then wait for `go`")
GRID_EVAL_PEOPLE = flags.DEFINE_integer("grid_eval_people", 64, "grid: people of each eval "
                                        "part (held out, QA-trained) whose QA the vmap mode's "
                                        "eval timing decodes (0: no eval timing)", lower_bound=0)
_GRID_ARGS = {}   # grid: the --config spec and overrides, taken off argv before absl parses it
STARTUP_REPEATS = flags.DEFINE_integer("startup_repeats", 3, "startup: fresh processes per "
                                      "import (the least CPU time counts)", lower_bound=1)
EVAL_FIXED_WIDTH = flags.DEFINE_bool("eval_fixed_width", True, "eval: also time the older "
                                     "fixed-width recompute baseline "
                                     "(kv_cache_speedup_vs_fixed_width)")


def measurement(name: str, value, unit: str, **context) -> dict:
  return {"name": name, "value": value, "unit": unit, **context}


def human(n: int) -> str:
  """10_000_000 -> '10m', 100_000 -> '100k' (for measurement names)."""
  for div, suffix in ((1_000_000_000, "g"), (1_000_000, "m"), (1_000, "k")):
    if n % div == 0:
      return f"{n // div}{suffix}"
  return str(n)


# -- data: the pretraining pipeline ------------------------------------------------------------
def time_pipeline(chunks, batch_size: int, workers: int) -> dict:
  from kstore_jax.data import batches, pipeline
  it = iter(pipeline.make_pipeline(chunks, global_batch=batch_size, workers=workers))
  try:
    t0 = time.perf_counter()
    for _ in range(WARMUP.value):
      next(it)
    startup = time.perf_counter() - t0
    n = tokens = nonpad = 0
    t0 = time.perf_counter()
    while True:
      seg = next(it)[batches.SEGMENT_IDS]
      n += 1
      tokens += seg.size
      nonpad += int(np.count_nonzero(seg))
      elapsed = time.perf_counter() - t0
      if (elapsed >= MIN_SECONDS.value and n >= MIN_BATCHES.value) or elapsed >= MAX_SECONDS.value:
        break
  finally:
    it.close()
  return dict(tokens_per_s=tokens / elapsed, batches=n, seconds=round(elapsed, 3),
              startup_s=round(startup, 3), utilisation=nonpad / tokens)


def bench_data(cfg) -> list[dict]:
  from kstore_jax.data import tokenizer, world
  t0 = time.perf_counter()
  tok = tokenizer.of_config(cfg)
  t1 = time.perf_counter()
  w = world.build_world(cfg, tok)
  t2 = time.perf_counter()
  chunks = w.chunks("pretrain", cfg.data)
  with cli.config_errors():  # e.g. data.seq_len shorter than a document: one line, not a trace
    chunks[0]
  ctx = dict(config=cfg.name, scale=cfg.scale, n_people=cfg.data.n_people,
             bios=sum(len(s) for s in w.bio_mixture()[0]), seq_len=cfg.data.seq_len,
             batch_size=cfg.pretrain.batch_size, chunk_docs=cfg.data.chunk_docs)
  out = [measurement("tokenizer_build_s", round(t1 - t0, 3), "s", vocab_size=tok.get_vocab_size(),
                     trained=not cfg.data.tokenizer_path),
         measurement("world_build_s", round(t2 - t1, 3), "s", **ctx)]
  runs = {}
  for w_str in WORKERS.value:
    workers = int(w_str)
    r = runs[workers] = time_pipeline(chunks, cfg.pretrain.batch_size, workers)
    out.append(measurement(f"pipeline_tokens_per_s_workers{workers}", round(r["tokens_per_s"]),
                           "tokens/s", workers=workers, batches=r["batches"],
                           seconds=r["seconds"], startup_s=r["startup_s"], **ctx))
  best = max(runs, key=lambda k: runs[k]["tokens_per_s"])
  out.append(measurement("pipeline_tokens_per_s", round(runs[best]["tokens_per_s"]), "tokens/s",
                         workers=best, cpus=os.cpu_count(), **ctx))
  first = next(iter(runs))
  out.append(measurement("pipeline_packing_utilisation", round(runs[first]["utilisation"], 4),
                         "fraction", batches=runs[first]["batches"], **ctx))
  for fmt in IMPORTED.value:
    out += bench_imported(cfg, w, fmt, ctx)
  return out


def bench_imported(cfg, w, fmt: str, ctx: dict) -> list[dict]:
  """World `w` exported as `fmt` into a temporary directory and imported back (data.source,
  the exported tokenizer: the generator's token stream): the import's seconds (read, check,
  tokenise) and its pretraining pipeline's tokens/s at each --workers."""
  from kstore_jax.data import export, tokenizer, world
  with tempfile.TemporaryDirectory() as tmp, cli.config_errors():
    spec = export.export(w, tmp, fmt)
    c = cfg.copy_and_resolve_references()
    c.data.update(source=spec, tokenizer_path=os.path.join(tmp, export.TOKENIZER))
    t0 = time.perf_counter()
    imported = world.build_world(c, tokenizer.get_tokenizer(c.data))
    build_s = time.perf_counter() - t0
    chunks = imported.chunks("pretrain", c.data)
    tokens = len(imported.stored.tokens)
    out = [measurement(f"imported_{fmt}_build_s", round(build_s, 3), "s", tokens=tokens,
                       import_tokens_per_s=round(tokens / build_s), **ctx)]
    for w_str in WORKERS.value:
      r = time_pipeline(chunks, cfg.pretrain.batch_size, int(w_str))
      out.append(measurement(f"imported_{fmt}_tokens_per_s_workers{w_str}",
                             round(r["tokens_per_s"]), "tokens/s", workers=int(w_str),
                             batches=r["batches"], seconds=r["seconds"],
                             startup_s=r["startup_s"], cpus=os.cpu_count(), **ctx))
  return out


# -- population: building N people -----------------------------------------------------------
_POPULATION_CHILD = r"""
import dataclasses, json, resource, sys, time
import numpy as np
from kstore_jax.data import population
def rss():
  # VmHWM: this process's peak RSS. ru_maxrss would also count the parent's RSS before exec.
  try:
    with open("/proc/self/status") as f:
      return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
n = int(sys.argv[1])
population.make_population(0, 10)  # load the pools and warm the imports
base = rss()
t0 = time.perf_counter()
pop = population.make_population(0, n)
dt = time.perf_counter() - t0
arrays = [getattr(pop, f.name) for f in dataclasses.fields(pop)]
nbytes = sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))
print(json.dumps(dict(seconds=dt, nbytes=nbytes, peak_rss=rss(), base_rss=base)))
"""


def child_env() -> dict:
  """This environment with the project's root first on PYTHONPATH (a child imports this
  checkout's kstore_jax and configs)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(kstore_jax.__file__)))
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}


def bench_population(cfg) -> list[dict]:
  from kstore_jax.data.pools import load_pools
  del cfg
  n, most = N_PEOPLE.value, load_pools().name_space // 2   # (make_population's bound)
  if n > most:
    raise cli.ConfigError(f"--n={n}: at most {most} people (half the name space)")
  proc = subprocess.run([sys.executable, "-c", _POPULATION_CHILD, str(n)], env=child_env(),
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"population benchmark failed:\n{proc.stderr}")
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  tag = f"population_{human(n)}"
  return [
      measurement(f"{tag}_build_s", round(r["seconds"], 3), "s", n_people=n),
      measurement(f"{tag}_bytes", r["nbytes"], "bytes", n_people=n,
                  bytes_per_person=round(r["nbytes"] / n, 2)),
      measurement(f"{tag}_peak_rss_bytes", r["peak_rss"], "bytes", n_people=n,
                  rss_before_build_bytes=r["base_rss"],
                  build_peak_over_baseline_bytes=r["peak_rss"] - r["base_rss"]),
  ]


# -- startup: what every process pays before its first step -----------------------------------
# Each CLI command, grid process and test subprocess imports these; the suite starts ~180.
# ml_dtypes alone: 0.7.0 registers its ufunc loops in quadratic time (1.4 s, BENCHMARKS.md).
STARTUP_IMPORTS = {
    "ml_dtypes": "import ml_dtypes",
    "jax": "import jax",
    "run_path": "import kstore_jax.experiment, kstore_jax.tools.main, kstore_jax.eval.qa_eval",
}


def bench_startup(cfg) -> list[dict]:
  """CPU and wall seconds of a fresh process that imports each of STARTUP_IMPORTS (and
  exits), the least CPU of --startup_repeats processes, in this environment."""
  del cfg
  # the installed versions the children import (read from metadata: importing jax here would
  # cost this process the startup it measures)
  ctx = dict(python=sys.version.split()[0], jax=importlib.metadata.version("jax"),
             ml_dtypes=importlib.metadata.version("ml_dtypes"), numpy=np.__version__,
             repeats=STARTUP_REPEATS.value)
  env = child_env()
  out = []
  for name, code in STARTUP_IMPORTS.items():
    samples = []   # (CPU s, wall s) of each process
    for _ in range(STARTUP_REPEATS.value):
      before = os.times()
      t0 = time.perf_counter()
      proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=False)
      wall = time.perf_counter() - t0
      after = os.times()
      if proc.returncode:
        raise RuntimeError(f"startup benchmark: `{code}` failed:\n{proc.stderr}")
      samples.append((after.children_user - before.children_user
                      + after.children_system - before.children_system, wall))
    cpu, wall = min(samples)
    out.append(measurement(f"startup_{name}_cpu_s", round(cpu, 3), "s", code=code,
                           wall_s=round(wall, 3), **ctx))
  return out


# -- eval: QA generation with and without a KV cache -----------------------------------------
def _time_interleaved(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
  """(median s, min s, last result) per function: one warm-up (compile) call each, then
  `repeats` rounds calling each once, interleaved so that a change in the machine's load
  affects all of them alike."""
  import jax
  out = {k: jax.block_until_ready(fn()) for k, fn in fns.items()}
  times = {k: [] for k in fns}
  for _ in range(max(repeats, 1)):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      out[k] = jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return ({k: float(np.median(t)) for k, t in times.items()},
          {k: float(np.min(t)) for k, t in times.items()}, out)


def bench_eval(cfg) -> list[dict]:
  import jax.numpy as jnp
  from kstore_jax import experiment
  from kstore_jax.data import tokenizer
  from kstore_jax.eval import generate, qa_eval
  from kstore_jax.model.transformer import count_params

  workdir = WORKDIR.value
  if workdir and not os.path.isdir(workdir):
    raise cli.ConfigError(f"--workdir={workdir}: no such directory")
  with cli.config_errors():
    tok_path = os.path.join(workdir, rundir.TOKENIZER) if workdir else ""
    tok = (tokenizer.load_tokenizer(tok_path) if os.path.exists(tok_path)
           else tokenizer.of_config(cfg))
    exp = experiment.Experiment(cfg, tok, experiment.Workdir(workdir or os.getcwd()))
    if workdir:   # the finished training stage that `eval` would read
      stage = exp.source_stage("eval", TRAIN_STAGES)
      params = exp.load_final(stage)
    else:
      stage = "random_init"
      params = exp.random_params(cfg.seed)
  w = exp.world
  people = (np.concatenate([w.test_people, w.train_people])[:EVAL_PEOPLE.value]
            if EVAL_PEOPLE.value else np.concatenate(exp.eval_people()))
  # The batches QA eval runs (qa_eval.qa_correct: sorted by length, few widths). Both paths
  # decode them with the same early stop at EOT.
  qs = qa_eval.qa_set(w, people)
  n_q = len(qs.attrs_N)
  batches = [b for _, _, b in qa_eval.length_batches(
      qs, EVAL_BATCH.value or cfg.eval.batch_size, qa_eval.positions_per_compile(exp.model_cfg))]
  max_new = EVAL_MAX_NEW.value or qs.answers_NW.shape[1]
  eot = w.renderer.eot_id
  kv_args, fixed_args = [], []
  for b in batches:
    kv_args.append((jnp.asarray(b.rest_NR), jnp.asarray(b.rest_lens_N), max_new, eot,
                    b.prefixes()))
    prompts, plens = b.prompts(w.pad_id)
    fixed_args.append((jnp.asarray(prompts), jnp.asarray(plens), max_new, eot))
  run = lambda fn, args: [fn(exp.model, params, *a) for a in args]
  # kv: the KV cache (what QA eval runs); re: the best simple no-cache decoder on the same
  # split questions; fixed: the older fixed-width recompute on whole questions.
  paths = {"kv": lambda: run(generate.generate, kv_args),
           "re": lambda: run(generate.generate_recompute, kv_args)}
  if EVAL_FIXED_WIDTH.value:
    paths["fixed"] = lambda: run(generate.generate_recompute_fixed_width, fixed_args)
  load_before = os.getloadavg()[0]   # the machine's load around the timing (shared machines)
  med, low, toks = _time_interleaved(paths, EVAL_REPEATS.value)
  same = lambda k: all(np.array_equal(np.asarray(a), np.asarray(b))
                       for a, b in zip(toks["kv"], toks[k]))
  flops = generate.generation_flops(exp.model_cfg, batches, max_new)
  flops_ratio = flops["recompute"] / flops["kv_cache"]
  speedup = med["re"] / med["kv"]
  ctx = dict(config=cfg.name, scale=cfg.scale, model_size=size_name(cfg.model),
             params=int(count_params(params)), params_from=stage, questions=n_q,
             batches=len(batches), batch=int(batches[0].rest_NR.shape[0]),
             prompt_len_mean=round(float(qs.prompt_lens_N.mean()), 2),
             rest_widths=[int(b.rest_NR.shape[1]) for b in batches], max_new=int(max_new),
             repeats=EVAL_REPEATS.value, dtype=cfg.model.dtype,
             device=jax_device_kind(), cpus=os.cpu_count(),
             load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
  out = [
      measurement("kv_cache_eval_s", round(med["kv"], 4), "s", min_s=round(low["kv"], 4), **ctx),
      measurement("recompute_eval_s", round(med["re"], 4), "s", min_s=round(low["re"], 4),
                  **ctx),
      measurement("kv_cache_speedup", round(speedup, 2), "ratio",
                  identical=same("re"), of_min_times=round(low["re"] / low["kv"], 2),
                  flops_ratio=round(flops_ratio, 2),
                  of_flops_ratio=round(speedup / flops_ratio, 3), **ctx),
  ]
  if "fixed" in med:
    out += [
        measurement("recompute_fixed_width_eval_s", round(med["fixed"], 4), "s",
                    min_s=round(low["fixed"], 4), **ctx),
        measurement("kv_cache_speedup_vs_fixed_width", round(med["fixed"] / med["kv"], 2),
                    "ratio", identical=same("fixed"),
                    of_min_times=round(low["fixed"] / low["kv"], 2),
                    flops_ratio=round(flops["fixed_width"] / flops["kv_cache"], 2), **ctx)]
  out.append(measurement("qa_eval_questions_per_s", round(n_q / med["kv"], 1), "questions/s",
                         **ctx))
  return out


# -- train: step FLOP/s vs the machine's matmul FLOP/s -----------------------------------------
def peak_rss_bytes() -> int:
  """This process's peak resident size (VmHWM)."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def on_cpu() -> bool:
  """Whether JAX's default backend is the CPU (the benches' sizes follow it)."""
  import jax
  return jax.default_backend() == "cpu"


def matmul_size() -> int:
  """The reference matmul's n: --matmul_n, else 2048 on a CPU, 8192 on an accelerator (fills
  the chip)."""
  return MATMUL_N.value or (2048 if on_cpu() else 8192)


def measure_train(cfg, **kw) -> dict:
  """`throughput.measure` of the config's pretrain step: an Experiment in a temporary workdir,
  the model's output head widened to GPT-2's vocabulary with --gpt2_vocab (the data's ids stay
  below the world's vocabulary)."""
  from kstore_jax import experiment
  from kstore_jax.data import tokenizer
  from kstore_jax.model import transformer
  from kstore_jax.train import throughput
  with tempfile.TemporaryDirectory() as tmp:
    exp = experiment.Experiment(cfg, tokenizer.of_config(cfg), experiment.Workdir(tmp))
    if GPT2_VOCAB.value:
      exp.model_cfg = dataclasses.replace(exp.model_cfg, vocab_size=throughput.GPT2_VOCAB)
      exp.model = transformer.Transformer(exp.model_cfg)
    return throughput.measure(exp.train_spec("pretrain"), exp.mesh, cfg.seed, exp.model_cfg,
                              runs=COHORT_RUNS.value, **kw)


def flash_launch(cfg) -> dict:
  """A bench line's `flash_launch` context: the launch the config names for pallas_docs
  (model.flash_launch), where it names one."""
  return {"flash_launch": cfg.model.flash_launch} if cfg.model.flash_launch else {}


def bench_train(cfg) -> list[dict]:
  from kstore_jax.train import throughput
  r = measure_train(cfg, steps=TRAIN_STEPS.value)
  n = matmul_size()
  matmul = throughput.matmul_flops_per_s(r["dtype"], n)
  ctx = dict(config=cfg.name, scale=cfg.scale, model=size_name(cfg.model), params=r["params"],
             vocab=r["vocab"], batch_size=cfg.pretrain.batch_size, seq_len=cfg.data.seq_len,
             dtype=r["dtype"], attention=r["attention"], remat=cfg.model.remat,
             cohort_runs=COHORT_RUNS.value, device=jax_device_kind(), **flash_launch(cfg))
  out = [measurement("train_tokens_per_s", round(r["tokens_per_s"], 1), "tokens/s", **ctx),
         measurement("train_step_s", round(r["step_s"], 4), "s", loss=round(r["loss"], 4),
                     first_step_s=round(r["first_step_s"], 2),
                     compile_s=round(r["compile_s"], 2), **ctx),
         measurement("train_flops_per_s", round(r["flops_per_s"] / 1e9, 2), "GFLOP/s", **ctx),
         measurement("matmul_flops_per_s", round(matmul / 1e9, 2), "GFLOP/s", n=n, **ctx),
         # MFU's accounting (attention counted in full); `within_documents`: the same with
         # attention's FLOPs as attending causally within the packed documents needs them
         measurement("train_flops_vs_matmul", round(r["flops_per_s"] / matmul, 3), "ratio",
                     within_documents=round(r["flops_per_s_within_documents"] / matmul, 3),
                     attention_share=round(r["attention_share"], 4),
                     attention_within_documents=round(r["attention_within_documents"], 3),
                     **ctx),
         # the config's whole pretrain stage at this step time (paper config: 80k steps)
         measurement("pretrain_projected_hours", round(r["step_s"] * cfg.pretrain.steps / 3600, 3),
                     "hours", steps=cfg.pretrain.steps, **ctx),
         measurement("peak_rss_bytes", peak_rss_bytes(), "bytes", heap_released=r["heap_released"],
                     steps_inline=r["steps_inline"], huge_pages=heap.huge_pages_asked(), **ctx)]
  if r["peak"]:
    out.append(measurement("train_mfu", round(r["flops_per_s"] / r["peak"], 3), "fraction",
                           peak_flops_per_s=r["peak"], **ctx))
  return out


def bench_profile(cfg) -> list[dict]:
  """`bench train`'s step under jax.profiler: the step time, the ops that take the most time
  per step (device tracks on an accelerator), as `profile_op_us` lines with the jax code each
  came from (`source`) and what it does (`kind`: profiling.hlo_kinds), the time summed by
  part of the step (`profile_scope_us`: module path without the layer index, or `step` for
  the loss head and optimizer; `unknown`: ops the HLO does not name) and by kind
  (`profile_kind_us`: matmul, the attention kernel, element-wise, reduction, copies, ...).
  Shares are of the ops' summed time, `busy_us_per_step`: on a CPU XLA runs independent ops
  on several threads at once, so that sum exceeds the step. On a GPU of known ceilings
  (train/aot.py CEILINGS) each line also carries `floor_us`, the kernels' floor at them
  (train/roofline.py): time over floor is what each kernel leaves on the table."""
  import collections
  import jax
  from kstore_jax.train import aot, profiling, roofline, throughput
  steps = 3
  with tempfile.TemporaryDirectory() as tmp:
    r = measure_train(cfg, steps=TRAIN_STEPS.value, trace_dir=tmp, trace_steps=steps)
    with open(os.path.join(tmp, throughput.TRACED_HLO)) as f:
      hlo = f.read()
    sources, kinds = profiling.hlo_sources(hlo), profiling.hlo_kinds(hlo)
    totals, where = profiling.trace_op_times(tmp, sources)
  # on a GPU of known ceilings each kernel's floor beside its time (train/roofline.py)
  target = aot.target_of(jax.devices()[0].device_kind)
  floors, tiny = collections.Counter(), set()
  if target is not None:
    try:
      for k in roofline.kernels(hlo):
        floors[profiling.op_key(k.name)] += k.floor_s(**aot.CEILINGS[target]) * 1e6
        if k.tiny:
          tiny.add(profiling.op_key(k.name))
    except (ValueError, KeyError, AttributeError, IndexError) as e:
      # HLO this reader does not know (another XLA's): the profile keeps its times, said so
      floors.clear()
      tiny.clear()
      print(f"bench profile: no floors, the step's HLO could not be read ({e!r})",
            file=sys.stderr, flush=True)
  ctx = dict(config=cfg.name, scale=cfg.scale, dtype=r["dtype"], attention=r["attention"],
             cohort_runs=COHORT_RUNS.value, device=jax_device_kind(), **flash_launch(cfg))
  busy = sum(totals.values()) / steps
  # the launch-bound kernels' time (roofline.TINY_BYTES), which their floor does not count
  timed = tiny & totals.keys()
  launch = ({"tiny_kernels": len(timed),
             "tiny_us_per_step": round(sum(totals[n] for n in timed) / steps)}
            if floors else {})
  out = [measurement("profile_step_s", round(r["step_s"], 4), "s", busy_us_per_step=round(busy),
                     **({"floor_us_per_step": round(sum(floors.values()))} if floors else {}),
                     **launch, tracks=where, **ctx)]
  share = lambda us: round(us / steps / max(busy, 1e-9), 4)
  floor = lambda us: {"floor_us": round(us, 1)} if floors else {}
  for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:PROFILE_TOP.value]:
    out.append(measurement("profile_op_us", round(us / steps, 1), "us/step", op=name[:120],
                           share=share(us), kind=kinds.get(name, "unknown"),
                           **floor(floors[name]), source=sources.get(name, "")[-160:], **ctx))
  # the same time summed by part of the step, then by kind of op (with the floors of the
  # kernels the trace timed)
  for key, of in (("scope", lambda n: profiling.scope_of(sources[n]) if n in sources
                   else "unknown"), ("kind", lambda n: kinds.get(n, "unknown"))):
    summed, floor_sum = collections.Counter(), collections.Counter()
    for name, us in totals.items():
      summed[of(name)] += us
      floor_sum[of(name)] += floors[name]
    for value, us in sorted(summed.items(), key=lambda kv: -kv[1]):
      out.append(measurement(f"profile_{key}_us", round(us / steps, 1), "us/step",
                             **{key: value}, share=share(us), **floor(floor_sum[value]),
                             **ctx))
  return out


def hlo_facts(text: str) -> dict:
  """From a StableHLO module's text: the custom-call targets it uses (and how many calls of
  each), the largest float32 rank-4 tensor it names, in bytes (XLA attention's [B, H, L, T]
  scores show up as one), and how many shard_maps it holds."""
  named = (re.findall(r"custom_call @([\w.$-]+)", text)
           + re.findall(r'call_target_name = "([^"]+)"', text))
  calls = set(named)
  f32_4d = [math.prod(int(d) for d in m.split("x")) * 4
            for m in re.findall(r"tensor<(\d+x\d+x\d+x\d+)xf32>", text)]
  # shard_maps (a kernel XLA cannot partition runs per shard in one: attention.per_shard)
  return dict(custom_calls=sorted(calls), call_counts={c: named.count(c) for c in sorted(calls)},
              max_f32_4d_buffer_bytes=max(f32_4d, default=0),
              manual_computations=text.count("sdy.manual_computation("))


def bench_lower(cfg) -> list[dict]:
  """Lower (not compile, not run) the config's pretrain step (alone, and as a grid of two runs
  vmapped) and its KV-cache QA decoding for --platform on this machine, with `auto` resolved
  for that platform: which attention and custom calls it uses, and its largest float32 rank-4
  buffer. A CPU host checks what a GPU/TPU would run."""
  import jax
  import jax.numpy as jnp
  from kstore_jax import experiment
  from kstore_jax.data import tokenizer
  from kstore_jax.eval import generate, qa_eval
  from kstore_jax.model import attention
  from kstore_jax.model.transformer import count_params, flops_per_token
  from kstore_jax.train import loop
  platform = PLATFORM.value   # the config was validated for it
  with cli.config_errors():   # nothing is written to the workdir
    exp = experiment.Experiment(cfg, tokenizer.of_config(cfg),
                                experiment.Workdir(os.getcwd()), platform=platform)
  spec = exp.train_spec("pretrain")
  B, L = cfg.pretrain.batch_size, cfg.data.seq_len
  with attention.lowering_target(platform, exp.mesh):
    train_text = loop.traced_step(spec, exp.mesh, cfg.seed).lower(
        lowering_platforms=(platform,)).as_text()
    # the same step as a grid runs it: two runs vmapped over a leading run axis
    grid_text = loop.traced_step(spec, exp.mesh, cfg.seed, runs=2).lower(
        lowering_platforms=(platform,)).as_text()
    # QA decoding as evaluation runs it: a batch of questions, prefill + greedy KV-cache steps
    qs = qa_eval.qa_set(exp.world, exp.world.test_people[:8])
    _, _, b = next(iter(qa_eval.length_batches(qs, 8)))
    max_new = qs.answers_NW.shape[1]
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          exp.model_abstract[0])
    decode_text = generate.generate.trace(
        exp.model, params, jnp.asarray(b.rest_NR), jnp.asarray(b.rest_lens_N), max_new,
        exp.world.renderer.eot_id, b.prefixes()).lower(
            lowering_platforms=(platform,)).as_text()
  train, decode, grid = hlo_facts(train_text), hlo_facts(decode_text), hlo_facts(grid_text)
  mc = exp.model_cfg
  return [measurement(
      "lowered", True, "bool", platform=platform, attention=mc.attention, norm=mc.norm,
      dtype=mc.dtype,
      custom_calls=sorted(set(train["custom_calls"]) | set(decode["custom_calls"])),
      max_f32_4d_buffer_bytes=max(train["max_f32_4d_buffer_bytes"],
                                  decode["max_f32_4d_buffer_bytes"]),
      scores_f32_bytes=B * mc.num_heads * L * L * 4,
      train=train, decode=decode, grid=grid, params=int(count_params(params)),
      flops_per_token=flops_per_token(mc, L), config=cfg.name, batch_size=B, seq_len=L)]


def bench_roofline(cfg) -> Iterator[dict]:
  """Compile (not run) the config's pretrain step for a GPU or a TPU slice on this machine
  (--target, --devices; jax's CUDA plugin or libtpu: train/aot.py), alone or as a grid
  cohort of --cohort_runs runs, and count its floor from the optimised program
  (train/roofline.py): every kernel's time at the target's ceilings, one after another.
  `roofline_floor_s` is the step's floor with the MFU it would reach there (the most this
  program can), then the floor by kind of kernel, by part of the step and the --profile_top
  kernels that cost most; with ptxas (launch/aot_plugin.sh --ptxas) the Pallas kernels'
  builds (`roofline_builds`)."""
  from kstore_jax import experiment
  from kstore_jax.data import tokenizer
  from kstore_jax.model import attention
  from kstore_jax.train import aot, loop, memory, roofline, sharding
  target, platform = ROOFLINE_TARGET.value, aot.platform(ROOFLINE_TARGET.value)
  try:   # the config's mesh over n GPUs of one host (data parallel by default), or a slice
    n = aot.device_count(target, ROOFLINE_DEVICES.value)
    shape = sharding.mesh_shape(cfg.mesh, n)
    mesh = aot.mesh(target, sharding.AXES, tuple(shape))
  except ValueError as e:
    raise cli.ConfigError(f"--target={target}, --devices: {e}") from None
  except aot.PluginMissing as e:
    raise cli.ConfigError(f"bench roofline: {e}") from None
  with cli.config_errors():   # nothing is written to the workdir
    exp = experiment.Experiment(cfg, tokenizer.of_config(cfg),
                                experiment.Workdir(os.getcwd()), platform=platform, mesh=mesh)
  spec, runs = exp.train_spec("pretrain"), COHORT_RUNS.value
  # each Pallas kernel's registers, spills, wgmma (a GPU's)
  builds = platform == "cuda" and aot.ptxas() is not None
  dump = tempfile.mkdtemp() if builds else None
  start = time.perf_counter()
  with attention.lowering_target(platform, mesh):
    compiled = loop.traced_step(spec, mesh, cfg.seed, runs=runs).lower().compile(
        compiler_options={"xla_dump_to": dump} if builds else None)
  compile_s, text = time.perf_counter() - start, compiled.as_text()
  ceil = aot.CEILINGS[target]
  flops_s, bytes_s = ceil["flops_per_s"], ceil["bytes_per_s"]
  ks = roofline.kernels(text)
  floor = sum(k.floor_s(flops_s, bytes_s) for k in ks)
  model_flops = spec.flops_per_position * spec.positions_per_step * max(runs, 1)
  peak = loop.peak_flops(aot.name(target), exp.model_cfg.dtype)
  ctx = dict(config=cfg.name, scale=cfg.scale, dtype=exp.model_cfg.dtype,
             attention=exp.model_cfg.attention, norm=exp.model_cfg.norm, cohort_runs=runs,
             devices=n, mesh=dict(zip(sharding.AXES, shape)),
             device=aot.name(target), tflops_ceiling=flops_s / 1e12,
             tbytes_per_s_ceiling=bytes_s / 1e12)
  bound = lambda k: "matmul" if k.flops / flops_s > k.bytes / bytes_s else "memory"
  by_bound = roofline.summary(ks, flops_s, bytes_s, bound)
  yield measurement(
      "roofline_floor_s", round(floor, 6), "s", kernels=sum(k.runs for k in ks),
      tiny_kernels=sum(k.runs for k in ks if k.tiny),   # launch-bound (roofline.TINY_BYTES)
      matmul_tflop=round(sum(k.runs * k.flops for k in ks) / 1e12, 3),
      gbytes=round(sum(k.runs * k.bytes for k in ks) / 1e9, 2),
      **{f"{b}_bound_s": round(by_bound.get(b, (0, 0, 0, 0.0))[3], 6)
         for b in ("matmul", "memory")},
      model_tflop=round(model_flops / 1e12, 3),
      mfu_at_floor=round(model_flops / floor / peak / n, 4) if peak else None,
      collective_gbytes=round(sum(k.runs * k.bytes for k in ks if k.kind == "collective")
                              / 1e9, 3),
      compile_s=round(compile_s, 1),
      device_gbytes=round(memory.step_bytes(compiled) / 1e9, 3),   # does the step fit?
      **ctx)
  share = lambda t: round(t / floor, 4)
  for key, of in (("kind", lambda k: k.kind), ("scope", roofline.scope)):
    for value, (count, b, f, t) in sorted(roofline.summary(ks, flops_s, bytes_s, of).items(),
                                          key=lambda kv: -kv[1][3]):
      yield measurement(f"roofline_{key}_s", round(t, 6), "s", **{key: value}, kernels=count,
                        gbytes=round(b / 1e9, 3), tflop=round(f / 1e12, 4), share=share(t),
                        **ctx)
  for k in sorted(ks, key=lambda k: -k.floor_s(flops_s, bytes_s))[:PROFILE_TOP.value]:
    t = k.floor_s(flops_s, bytes_s)
    yield measurement("roofline_op_s", round(t, 7), "s", op=k.name, kind=k.kind,
                      mbytes=round(k.runs * k.bytes / 1e6, 1),
                      gflop=round(k.runs * k.flops / 1e9, 2), runs=k.runs, share=share(t),
                      source=k.source[-160:], **ctx)
  if builds:
    yield from roofline_builds(exp, dump, sorted(set(re.findall(r'name = "(\w+)"', text))), ctx)


def roofline_builds(exp, dump: str, names: list[str], ctx: dict) -> Iterator[dict]:
  """bench roofline's `roofline_build` lines: ptxas's report of each Pallas kernel of the
  compiled step (in the XLA dump `dump`), and with `pallas_docs` of its forward and backward
  at every launch bench attention times (pallas_docs_launches), compiled alone at the step's
  attention shape: registers a thread, spills, Hopper `wgmma` instructions and whether ptxas
  serialises them, what decides a kernel's occupancy and matrix rate before any device runs
  it (BENCHMARKS.md, "Registers of the attention kernels")."""
  import shutil
  import jax
  import jax.numpy as jnp
  from kstore_jax.model import attention, flash_docs
  from kstore_jax.train import aot
  for name, facts in aot.kernel_builds(dump, tuple(names)).items():
    yield measurement("roofline_build", facts.get("registers"), "registers", kernel=name,
                      launch="model", **facts, **ctx)
  shutil.rmtree(dump)
  mc, cfg = exp.model_cfg, exp.cfg
  if mc.attention != "pallas_docs":
    return
  H, K = mc.num_heads, mc.d_model // mc.num_heads
  B, L = cfg.pretrain.batch_size, cfg.data.seq_len
  rep = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((B, L, H, K), jnp.bfloat16, sharding=rep)
  seg = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=rep)
  for launch in pallas_docs_launches("cuda"):
    if launch.block > L or H % launch.heads:
      continue
    loss = lambda q, k, v, s, launch=launch: flash_docs.attention(
        q, k, v, s, causal=mc.causal, launch=launch).astype(jnp.float32).sum()
    dump = tempfile.mkdtemp()
    with attention.lowering_target("cuda", exp.mesh):
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, seg).lower().compile(
          compiler_options={"xla_dump_to": dump})
    for name, facts in aot.kernel_builds(dump, ("flash_docs_forward", "flash_docs_backward",
                                                "flash_docs_backward_kv",
                                                "flash_docs_backward_q")).items():
      yield measurement("roofline_build", facts.get("registers"), "registers", kernel=name,
                        launch=launch_suffix(launch).lstrip("_"), **facts, **ctx)
    shutil.rmtree(dump)


def bench_ceiling(cfg) -> list[dict]:
  """The device's own ceilings: dense matmul FLOP/s in float32 and bfloat16 (random data) and
  device-memory copy bandwidth."""
  del cfg
  from kstore_jax.train import throughput
  n = matmul_size()
  ctx = dict(device=jax_device_kind(), n=n)
  out = [measurement(f"matmul_{dt}_flops_per_s", round(throughput.matmul_flops_per_s(dt, n)
                                                        / 1e12, 2), "TFLOP/s", **ctx)
         for dt in ("bfloat16", "float32")]
  size = COPY_BYTES.value or ((1 << 28) if on_cpu() else (1 << 32))
  out.append(measurement("copy_bytes_per_s",
                         round(throughput.copy_bytes_per_s(size) / 1e9, 1), "GB/s",
                         buffer_bytes=size, device=jax_device_kind()))
  return out


def packed_segments(rng, B: int, L: int, min_doc: int, max_doc: int):
  """[B, L] segment ids and positions of rows packed with documents of random lengths in
  [min_doc, max_doc] left to right, padding (0) after, as the data pipeline packs them."""
  seg, pos = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
  for b in range(B):
    col, s = 0, 1
    while True:
      n = int(rng.integers(min_doc, max_doc + 1))
      if col + n > L:
        break
      seg[b, col:col + n], pos[b, col:col + n] = s, np.arange(n)
      col, s = col + n, s + 1
  return seg, pos


def pallas_docs_launches(platform: str):
  """bench attention's other launches of pallas_docs beside the model's (flash_docs.LAUNCH),
  the likeliest first (a deadline may cut the list), on a GPU ordered by what their H200
  builds read here hold (BENCHMARKS.md, "Registers of the attention kernels" and "Asymmetric
  tiles"): how many programs an SM's registers fit, a latency-bound kernel's lever. One
  pipeline stage (168 backward registers since session 49's transposed dk/dv scores: three
  programs an SM, against two at the model's 183); the loop's tiles halved (`inner` 32: 130,
  split 128 / 104, four programs) or quartered (16: 128); twice the warps at one stage, whole
  and split, with the loop's tiles halved too; the range's diagonal-end tiles unrolled (three
  at 64, two at 32); the backward split; twice the warps; 2 and 4 heads a program; three
  stages; the 128 tile with 8 warps over 32- and 64-position loop tiles and over its own; the
  tile halved (no Hopper `wgmma`: its dots are under 64 rows) and doubled (spills). On a CPU
  (interpret mode, where Triton's parameters mean nothing) the tiles, the loop's tiles
  halved, the split and the unrolled tiles."""
  from kstore_jax.model import flash_docs
  base = flash_docs.LAUNCH
  half = base.block // 2
  tiles = [base._replace(block=half), base._replace(block=base.block * 2)]
  if platform == "cpu":
    return tiles + [base._replace(inner=half), base._replace(split=True),
                    base._replace(unroll=3)]
  one = base._replace(stages=1)
  wide = one._replace(warps=base.warps * 2)
  return [
      one, one._replace(inner=half), one._replace(inner=half, split=True),
      one._replace(inner=half // 2), wide, wide._replace(inner=half),
      one._replace(unroll=3), one._replace(unroll=3, split=True),
      one._replace(inner=half, unroll=2), one._replace(unroll=2),
      wide._replace(split=True), wide._replace(inner=half, split=True),
      base._replace(split=True), base._replace(warps=base.warps * 2), base._replace(heads=2),
      base._replace(heads=4), base._replace(stages=3),
      wide._replace(block=base.block * 2, inner=half),
      wide._replace(block=base.block * 2, inner=base.block),
      base._replace(block=base.block * 2, warps=base.warps * 2)] + tiles


def launch_suffix(launch) -> str:
  """A pallas_docs launch's name suffix: what differs from the model's (`_t32`, `_w8s3`,
  `_h2`, `_w8s1_split`, `_s1u3`, `_i32s1`: 32-position loop tiles)."""
  from kstore_jax.model import flash_docs
  base = flash_docs.LAUNCH
  numbers = "".join(f"{tag}{getattr(launch, f)}" for tag, f in zip("tiwshu", (
      "block", "inner", "warps", "stages", "heads", "unroll"))
                    if getattr(launch, f) != getattr(base, f))
  return "_" + "_".join(p for p in (numbers, "split" if launch.split else "") if p)


def bench_attention(cfg) -> Iterator[dict]:
  """Causal self-attention over packed documents, forward + backward, for each implementation
  that runs here (ATTENTION, default all), at the config's shape (pretrain batch, seq_len,
  heads, head dim) in the config's compute dtype: median ms of the forward and backward pass
  alone (inputs and the output's cotangent in that dtype, no casts or loss timed: as a train
  step's layer runs it; before session 35 the timed function also cast f32 inputs and summed
  a loss), with `fwd_ms` the forward pass alone for each kernel at the model's settings, and
  the output's and gradients' error against XLA attention in float32 on the same rounded
  inputs (documents of 20-111 positions, as bioS packs). cudnn also with a tighter document
  bound, pallas_docs at the config's launch (model.flash_launch) and, with --attention_sweep,
  at other launches (`pallas_docs_launches`: tiles, loop tiles, warps, pipeline stages, heads
  a program, unrolled tiles), with `tiles_visited` (the share of a causal kernel's tiles'
  query x key positions it computes) and `launch` (as model.flash_launch names it). Each line is yielded (printed) as
  it is measured: a deadline keeps the kernels timed before it."""
  import jax
  import jax.numpy as jnp
  from kstore_jax.model import attention, flash_docs, transformer
  from kstore_jax.train import throughput
  platform = attention.platform_of(jax.devices())
  dtype = attention.resolve_dtype(cfg.model.dtype, platform)
  B, L = cfg.pretrain.batch_size, cfg.data.seq_len
  H, K = cfg.model.num_heads, cfg.model.d_model // cfg.model.num_heads
  rng = np.random.default_rng(0)
  seg, pos = (jnp.asarray(x) for x in packed_segments(rng, B, L, 20, 111))
  real = (seg > 0)[:, :, None, None]
  # q, k, v and the output's cotangent in the compute dtype, as the train step's attention
  # gets them
  q, k, v, do = (jax.random.normal(key, (B, L, H, K), jnp.float32).astype(dtype)
                 for key in jax.random.split(jax.random.PRNGKey(0), 4))
  do = do * real

  def fwd_bwd(impl, option=None):
    """(out, (dq, dk, dv)): the forward and backward pass alone (no casts, no loss: what a
    train step's layer runs); option: cudnn's document bound M, pallas_docs'
    flash_docs.Launch (None: the model's)."""
    def attend(q, k, v, pos, seg):
      if impl == "pallas_docs" and option:
        return flash_docs.attention(q, k, v, seg, True, platform == "cpu", launch=option)
      return attention.self_attention(impl, q, k, v, pos, seg, True,
                                      interpret=platform == "cpu", max_docs=option,
                                      launch=cfg.model.flash_launch)

    def run(q, k, v, do, pos, seg):
      out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, pos, seg), q, k, v)
      return out, vjp(do.astype(out.dtype))
    return jax.jit(run), jax.jit(attend)

  args = (q, k, v, do, pos, seg)
  # the reference: XLA's attention in float32 on the same (rounded) inputs
  ref = fwd_bwd("xla")[0](*(x.astype(jnp.float32) for x in (q, k, v, do)), pos, seg)
  ref_leaves = [ref[0]] + list(ref[1])
  ctx = dict(config=cfg.name, batch=B, seq_len=L, heads=H, head_dim=K, dtype=dtype,
             device=jax_device_kind())
  # fwd + bwd (3 x fwd) of one layer's attention over the batch, as the model's FLOP count
  # has it (MFU papers' accounting: causal counted in full)
  mc = transformer.ModelConfig.from_config(cfg.model, 0, platform)
  attention_flops = 3 * transformer.forward_flops(mc, L)["attention"] / mc.num_layers * B * L
  variants = [(i, None) for i in ATTENTION.value or attention.IMPLEMENTATIONS]
  if any(i == "cudnn" for i, _ in variants):   # the packed layout's document bound M matters?
    variants.append(("cudnn", L // 16))
  if ATTENTION_SWEEP.value and any(i == "pallas_docs" for i, _ in variants):   # its launches
    variants += [("pallas_docs", launch) for launch in pallas_docs_launches(platform)
                 if launch.block <= L and H % launch.heads == 0]
  for impl, option in variants:
    name = (f"attention_{impl}" + (f"_m{option}" if impl == "cudnn" and option else "")
            + (launch_suffix(option) if impl == "pallas_docs" and option else "") + "_ms")
    problem = attention.unsupported(impl, dtype, platform, L)
    if problem:
      yield measurement(name, None, "ms", skipped=problem, **ctx)
      continue
    print(f"[bench attention] {name}: compiling", file=sys.stderr, flush=True)
    fn, fwd = fwd_bwd(impl, option)
    t0 = time.perf_counter()
    try:
      got = jax.block_until_ready(fn(*args))
    except (jax.errors.JaxRuntimeError, ValueError) as e:   # a launch the chip cannot build
      # (shared memory, registers) or Triton refuses: said in its line, the sweep goes on
      yield measurement(name, None, "ms", skipped=f"failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:300]}", **ctx)
      continue
    compile_s = time.perf_counter() - t0
    errs = [float(jnp.linalg.norm(((a - b) * real).astype(jnp.float32))
                  / jnp.linalg.norm((b * real).astype(jnp.float32)))
            for a, b in zip([got[0]] + list(got[1]), ref_leaves)]
    ms = throughput.median_time(fn, *args, repeats=ATTENTION_REPEATS.value) * 1e3
    extra = {}
    if option is None:   # the kernel at the model's settings: its forward pass alone too
      extra["fwd_ms"] = round(throughput.median_time(
          fwd, q, k, v, pos, seg, repeats=ATTENTION_REPEATS.value) * 1e3, 3)
    if impl == "pallas_docs":   # the tiles' positions it computes, of a causal-only kernel's,
      # and the launch as model.flash_launch names it
      launch = option or flash_docs.parse_launch(cfg.model.flash_launch)
      block = min(launch.block, L)
      visited, causal_only = flash_docs.visited_tiles(seg, block, True, launch.unroll,
                                                      min(launch.inner, block))
      extra.update(tiles_visited=round(visited / causal_only, 3),
                   launch=flash_docs.launch_text(launch))
    yield measurement(name, round(ms, 3), "ms", tflops_per_s=round(attention_flops / ms / 1e9, 1),
                      compile_s=round(compile_s, 2), rel_err_out=errs[0], rel_err_dq=errs[1],
                      rel_err_dk=errs[2], rel_err_dv=errs[3], **extra, **ctx)


def jax_device_kind() -> str:
  import jax
  return f"{jax.devices()[0].device_kind} x{jax.device_count()}"


# -- probe: P-/Q-probe training throughput (frozen random base model) --------------------------
def bench_probe(cfg) -> list[dict]:
  """Probe training as `Experiment.probe` runs it (the stage's StageSpec, state built by
  loop.build_state, the train step jitted with run_stage's shardings, batches from the stage's
  Grain stream), on a random base model of the config's size: examples/s and tokens/s over
  PROBE_STEPS steps after 2 warm-up (compile) steps; batch rendering alone is timed too."""
  if cfg.data.groups:
    raise cli.ConfigError(f"bench probe: {configlib.PPROBE_GROUPS}")
  import jax
  from kstore_jax import experiment
  from kstore_jax.data import tokenizer
  from kstore_jax.model.transformer import count_params
  from kstore_jax.train import loop, sharding

  with cli.config_errors():
    exp = experiment.Experiment(cfg, tokenizer.of_config(cfg),
                                experiment.Workdir(os.getcwd()))   # nothing is written
  base = exp.random_params(cfg.seed)
  steps = PROBE_STEPS.value
  out = []
  for stage in PROBE_STAGES:
    spec = exp.probe_spec(stage, base)
    sc = spec.stage_cfg
    state_init, rng, _, _, train_step = loop.compile_stage(spec, exp.mesh, cfg.seed)
    data = iter(spec.data(0, 1))
    t0 = time.perf_counter()
    state = state_init(rng, spec.init_args)
    for _ in range(2):   # compile + one more
      state, metrics = train_step(state, base, sharding.to_global(next(data), exp.mesh))
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = train_step(state, base, sharding.to_global(next(data), exp.mesh))
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      next(data)
    data_s = time.perf_counter() - t0
    width = spec.positions_per_step // sc.batch_size
    ctx = dict(config=cfg.name, scale=cfg.scale, model_size=size_name(cfg.model),
               base_params=int(count_params(base)),
               probe_params=int(count_params(state["params"])), batch_size=sc.batch_size,
               width=width, embed_rank=sc.embed_rank, head=sc.head, steps=steps,
               step_s=round(elapsed / steps, 4), warmup_s=round(warmup_s, 2),
               batch_render_s=round(data_s / steps, 4), loss=round(float(metrics["loss"]), 4),
               dtype=cfg.model.dtype, device=jax.devices()[0].device_kind, cpus=os.cpu_count())
    out += [measurement(f"{stage}_examples_per_s", round(steps * sc.batch_size / elapsed, 1),
                        "examples/s", **ctx),
            measurement(f"{stage}_tokens_per_s", round(steps * spec.positions_per_step / elapsed),
                        "tokens/s", flops_per_s=round(steps * spec.positions_per_step
                                                      * spec.flops_per_position / elapsed),
                        **ctx)]
  return out


# -- grid: many runs in one vmapped step vs one after another ------------------------------
def bench_grid(_cfg) -> Iterator[dict]:
  """grid_speedup per run count R and grid mode: (median step seconds of R runs' first
  training stage, each alone, summed) / (the same steps as the grid runs them), measured back
  to back: `vmap` one cohort step; `processes` the runs shared out over one process per core
  (each pinned to it, all at once; the slowest process's summed step seconds). With `vmap`
  also grid_eval_speedup: the eval's QA decoding (--grid_eval_people of each part) of R
  runs one after another / decoded together as the grid's eval does it, after every R's
  training. Each run is timed alone once for every R it is in; each measurement is yielded
  (printed) as soon as it is made, so a deadline that stops the benchmark keeps what it
  measured (the device check's 240 s bound on an H200 once left nothing of R = 2, 4, 8)."""
  import jax
  from kstore_jax import experiment
  from kstore_jax.model import attention
  from kstore_jax.train import sharding, throughput
  spec, overrides = _GRID_ARGS.get("spec"), _GRID_ARGS.get("overrides", [])
  g = configlib.load_grid(spec, overrides)
  order = list(g.order)
  platform = attention.platform_of(jax.devices())
  stage = configlib.stage_list(g.runs[order[0]])[0]
  cores = sorted(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    exps = {}

    def members(names):
      for n in names:
        if n not in exps:
          exps[n] = experiment.open_experiment(g.runs[n], os.path.join(tmp, n),
                                               jax.device_count(), platform)[0]
      pairs = [exps[n].member(stage, n) for n in names]
      if len({key for _, key in pairs}) > 1:
        raise cli.ConfigError(f"bench grid: the runs' {stage} stages differ in shape or "
                              "settings, so they cannot share one step")
      return [m for m, _ in pairs], exps[names[0]].mesh

    if GRID_ALONE.value:   # a processes-mode child: its share of the runs, one after another
      ms, mesh = members(GRID_ALONE.value)
      ready = (functools.partial(throughput.barrier_wait, GRID_BARRIER.value)
               if GRID_BARRIER.value else None)
      yield measurement("grid_alone_step_s", throughput.alone_step_s(
          ms, mesh, TRAIN_STEPS.value, ready=ready), "s")
      return
    alone_s = {}   # run name -> its step's median seconds trained alone

    def alone_sum(names, ms, mesh):
      for n, m in zip(names, ms):
        if n not in alone_s:
          alone_s[n] = throughput.alone_step_s([m], mesh, TRAIN_STEPS.value)
      return sum(alone_s[n] for n in names)

    ctx = dict(stage=stage, config=spec, overrides=overrides,
               model=size_name(g.runs[order[0]].model), device=jax_device_kind(),
               cpus=len(cores))
    cohorts = [[order[i % len(order)] for i in range(int(r))] for r in GRID_RUNS.value]
    for names in cohorts:   # the training speedups of every R first, then the evals'
      r = len(names)
      ms, mesh = members(names)
      alone = alone_sum(names, ms, mesh)
      run_axis = sharding.run_axis_for(g.grid.run_axis, mesh, len(ms))   # vmap's placement
      for mode in GRID_MODES.value:
        if mode == "vmap":
          grid_s = throughput.cohort_step_s(ms, mesh, TRAIN_STEPS.value, run_axis=run_axis)
        elif mode == "processes" and len(cores) > 1:
          shares = [names[i::len(cores)] for i in range(min(len(cores), len(names)))]
          grid_s = max(processes_alone_s(shares, cores, spec, overrides))
        else:   # processes on one core: nothing to run side by side
          yield measurement("grid_speedup", None, "ratio", runs=r, mode=mode,
                            skipped="the processes mode needs 2 or more cores", **ctx)
          continue
        yield measurement("grid_speedup", round(alone / grid_s, 3), "ratio",
                          runs=r, mode=mode, devices=jax.device_count(),
                          run_axis=(run_axis or "replicated") if mode == "vmap" else None,
                          alone_step_s=round(alone, 4), grid_step_s=round(grid_s, 4),
                          **flop_rates(ms, alone, grid_s), **ctx)
    if "vmap" in GRID_MODES.value and GRID_EVAL_PEOPLE.value > 0:
      for names in cohorts:
        yield measure_grid_eval([exps[n] for n in names], ctx)


def flop_rates(members, alone_s: float, grid_s: float) -> dict:
  """The R runs' steps' FLOP/s, one after another and in the grid (`alone_tflops_per_s`,
  `grid_tflops_per_s`), and where the device's peak is known their MFU (`alone_mfu`,
  `grid_mfu`): how far each way is from the chip, so the speedup's ceiling can be read off."""
  from kstore_jax.train import loop
  flops = sum(m.spec.flops_per_position * m.spec.positions_per_step for m in members)
  tera = lambda x: float(f"{x / 1e12:.4g}")   # four significant digits, CPU or chip
  out = dict(alone_tflops_per_s=tera(flops / alone_s), grid_tflops_per_s=tera(flops / grid_s))
  peak = loop.device_peak_flops(members[0].spec.dtype)
  if peak:
    out.update(alone_mfu=round(flops / alone_s / peak, 4),
               grid_mfu=round(flops / grid_s / peak, 4))
  return out


def measure_grid_eval(exps, ctx) -> dict:
  """grid_eval_speedup of R runs (random params, one per run: no early stop, every question
  decoded to its full width): their QA decoded one run after another / in one vmapped pass
  (experiment.evaluate_runs' call), each the median of 3 after a warm-up call."""
  from kstore_jax.data.render import N_ATTR
  from kstore_jax.eval import qa_eval
  from kstore_jax.train import loop, throughput
  first = exps[0]
  parts = [p[:GRID_EVAL_PEOPLE.value] for p in first.eval_parts().values()]
  params = [e.random_params(i) for i, e in enumerate(exps)]
  stacked = loop.stack_runs(params)
  decode = lambda p, runs: qa_eval.qa_correct_parts(first.model, p, first.world, parts,
                                                    first.cfg.eval.batch_size, runs=runs)
  alone = throughput.median_time(lambda: [decode(p, False) for p in params], repeats=3)
  together = throughput.median_time(lambda: decode(stacked, True), repeats=3)
  return measurement("grid_eval_speedup", round(alone / together, 3), "ratio", runs=len(exps),
                     mode="vmap", questions=sum(len(p) for p in parts) * N_ATTR,
                     alone_s=round(alone, 4), together_s=round(together, 4), **ctx)


def processes_alone_s(shares, cores, spec, overrides) -> list[float]:
  """Each share of run names timed one after another by a `bench grid --grid_alone` child
  pinned to its own core, all children at once: their summed step seconds. The children
  compile and warm up, then time their steps together (`throughput.barrier_wait`): a child
  timed while another still compiled had the machine more to itself than the grid has."""
  from kstore_jax.train import throughput
  procs = []
  barrier = tempfile.mkdtemp(prefix="kstore_grid_barrier.")
  for share, core in zip(shares, cores):
    cmd = [sys.executable, "-m", "kstore_jax.bench", "grid", f"--config={spec}",
           f"--grid_alone={','.join(share)}", f"--train_steps={TRAIN_STEPS.value}",
           f"--grid_barrier={barrier}", *[f"--config.{o}" for o in overrides]]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, runtime.PIN_CORE: str(core)}))
  try:
    while (len([f for f in os.listdir(barrier) if f.startswith("ready.")]) < len(procs)
           and all(p.poll() is None for p in procs)):   # (a child that failed: reported below)
      time.sleep(0.01)
    open(os.path.join(barrier, throughput.BARRIER_GO), "w").close()
    return _children_values(procs)
  finally:
    shutil.rmtree(barrier, ignore_errors=True)


def _children_values(procs) -> list[float]:
  """The last JSON line's value of each finished `bench grid --grid_alone` child."""
  out = []
  for p in procs:
    stdout, stderr = p.communicate()
    if p.returncode != 0:
      raise RuntimeError(f"bench grid child failed (exit {p.returncode}): {stderr[-2000:]}")
    out.append(json.loads(stdout.strip().splitlines()[-1])["value"])
  return out


BENCHMARKS = {"train": bench_train, "data": bench_data, "population": bench_population,
              "eval": bench_eval, "probe": bench_probe, "ceiling": bench_ceiling,
              "attention": bench_attention, "profile": bench_profile, "lower": bench_lower,
              "grid": bench_grid, "startup": bench_startup, "roofline": bench_roofline}
NO_CONFIG = {"population", "ceiling", "grid", "startup"}   # grid reads its grid config itself


def _check_list(flag, ok, takes: str, empty: bool = False) -> None:
  """ConfigError naming the comma-list `flag` unless each of its values passes `ok` and, unless
  `empty`, it has one: `takes` says what it takes."""
  bad = [v for v in flag.value if not ok(v)]
  if bad or not (flag.value or empty):
    raise cli.ConfigError(f"--{flag.name}={','.join(flag.value)}: "
                          + (f"{bad[0]!r} is not {takes}" if bad else f"empty; expected {takes}"))


def check_lists() -> None:
  """The comma-list flags, before any work (a bad value failed deep inside a benchmark, with
  a traceback or two, or timed nothing): one line naming the flag and what it takes."""
  from kstore_jax.data import export

  def count(least: int):
    return lambda v: v.isdigit() and int(v) >= least

  _check_list(WORKERS, count(0), "a count of worker processes >= 0")
  _check_list(IMPORTED, export.FORMATS.__contains__,
              f"an export format ({', '.join(export.FORMATS)})", empty=True)
  _check_list(GRID_RUNS, count(1), "a run count >= 1")
  _check_list(GRID_MODES, ("vmap", "processes").__contains__, "a grid mode (vmap, processes)")
  if ATTENTION.value:   # (importing the kernels loads jax)
    from kstore_jax.model import attention
    _check_list(ATTENTION, attention.IMPLEMENTATIONS.__contains__,
                f"an attention implementation ({', '.join(attention.IMPLEMENTATIONS)})")


def _subcommand(argv) -> str | None:
  args = [a for i, a in enumerate(argv[1:], 1) if argv[i - 1] != "--config"]
  return next((a for a in args if not a.startswith("-")), None)


def main(argv):
  what = argv[1:]
  if len(what) != 1 or what[0] not in BENCHMARKS:
    raise cli.ConfigError(f"expected one benchmark out of {sorted(BENCHMARKS)}, got {what}")
  check_lists()
  # lower: for that platform; roofline: for its target's (compile-only devices)
  platform = PLATFORM.value if what[0] == "lower" else None
  if what[0] == "roofline":
    from kstore_jax.train import aot
    if ROOFLINE_TARGET.value not in aot.CEILINGS:
      raise cli.ConfigError(f"--target={ROOFLINE_TARGET.value!r}: expected one of "
                            f"{', '.join(aot.CEILINGS)}")
    platform = aot.platform(ROOFLINE_TARGET.value)
  cfg = None if what[0] in NO_CONFIG else cli.validated_config(CONFIG.value, platform=platform)
  for r in BENCHMARKS[what[0]](cfg):   # a list, or an iterator: each line as it is measured
    sys.stderr.flush()
    print(json.dumps(r), flush=True)


def run() -> None:
  """`python -m kstore_jax.bench` (the shim kstore_jax/bench.py calls this)."""
  runtime.prepare_process()   # CPU: malloc on 2 MiB pages, steps run inline (heap.py)
  runtime.pin_to_core_from_env()   # a bench grid child of the processes mode
  if _subcommand(sys.argv) == "grid":   # a grid config: its overrides apply to every run
    sys.argv, _GRID_ARGS["spec"], _GRID_ARGS["overrides"] = configlib.split_config_args(
        sys.argv)
  cli.run(main, "kstore_jax.bench",
          config_required=lambda argv: _subcommand(argv) in set(BENCHMARKS) - NO_CONFIG)
