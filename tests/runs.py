"""Shared settings for tests that train through `python -m kstore_jax.main` subprocesses."""

import functools
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Keys that must be identical between an interrupted+resumed run and an uninterrupted one.
DETERMINISTIC = ("step", "loss", "grad_norm", "lr", "loss_tokens")


def small_run_args(steps: int, save_every: int, layers: int = 1,
                   lr: float | None = 5e-3) -> list[str]:
  """A tiny single-row pretraining run: 100 people, `layers` layers of width 64 (4 heads),
  batch 8. One layer by default: these runs' CPU time is tracing and compiling, which grows
  with the unrolled layers, and what they check (equal losses, bitwise resumes, a falling
  loss) does not need a second one. Peak lr 5e-3, the setting the 1e-5 grid-vs-solo and
  devices tolerances were set at: at tiny's own 1.2e-2 (session 33) this 64-wide, 8-row run
  amplifies the float-order difference of a vmapped step to 4e-5 relative by step 17.
  lr=None leaves the config's own (a row config that sets its lr)."""
  return [
      "--config.data.n_people=100", "--config.data.seq_len=160", "--config.data.vocab_size=1024",
      f"--config.model.num_layers={layers}", "--config.model.d_model=64",
      "--config.model.num_heads=4",
      "--config.model.d_ff=128", "--config.pretrain.batch_size=8",
      f"--config.pretrain.steps={steps}", "--config.pretrain.warmup_steps=2",
      "--config.train.log_every=1", f"--config.train.save_every={save_every}",
      "--config.stages=pretrain",
  ] + ([] if lr is None else [f"--config.pretrain.lr={lr}"])


def micro_stage_args(batch_size: int, save_every: int, **steps: int) -> list[str]:
  """A 1-layer, width-32 model and `steps` (stage name -> steps) at `batch_size`, logging
  every step: the smallest end-to-end run of the given stages."""
  return [
      "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
      "--config.model.d_ff=64",
      *(a for stage, n in steps.items()
        for a in (f"--config.{stage}.steps={n}", f"--config.{stage}.batch_size={batch_size}")),
      "--config.train.log_every=1", f"--config.train.save_every={save_every}",
  ]


# Variables that make a run join a cluster (runtime.maybe_initialize_distributed): a test's
# subprocess gets them only when it asks (the two-process tests).
CLUSTER_VARS = ("KSTORE_NUM_PROCESSES", "KSTORE_PROCESS_ID", "KSTORE_COORDINATOR",
                "SLURM_NTASKS", "TPU_WORKER_ID", "JAX_COORDINATOR_ADDRESS")


# XLA:CPU flags that trade step speed for compile time. The default suite is compile-bound:
# a test's run is a few steps of a toy model, so compiling its programs is most of its CPU time
# (measured, a cold-cache bf16 test run: 52.9 CPU-s at XLA's defaults, 32.1 at optimisation
# level 0 without the expensive LLVM passes, 27.7 with XLA:CPU's older loop emitters as well;
# 15 from a warm cache). Steps run up to ~2x slower (tiny train step on one core: 0.96 -> 1.82
# s) with the same loss; a run whose steps dominate (test_demo_fast) asks for the defaults
# (`optimize`). Every test compares computations compiled with the same flags.
# The older emitters alone break programs with collectives (two local devices: each device
# thread waited in a different all-reduce of one step; two processes: gloo received a 57,344-
# byte message where it expected 4, "collective mismatch"; 2-3 of test_multiprocess's 7 tests
# in each of two runs): XLA:CPU's concurrency-optimised scheduler lets the processes' (and
# devices') copies of one program issue them in different orders. Without that scheduler they
# pass (test_multiprocess 7 of 7 in two runs) and compile a 2-device toy train step in 0.9 s
# instead of 2.9 (one device: 0.8 s either way).
# Each flag: (its fast value, XLA's default).
FAST_COMPILE = {"xla_backend_optimization_level": (0, 3),
                "xla_llvm_disable_expensive_passes": (True, False),
                "xla_cpu_use_fusion_emitters": (False, True),
                "xla_cpu_enable_concurrency_optimized_scheduler": (False, True)}
FAST_COMPILE_FLAGS = tuple(f"--{k}={str(fast).lower()}" for k, (fast, _) in FAST_COMPILE.items())


@functools.cache
def fast_compile_flags() -> str:
  """The FAST_COMPILE_FLAGS this jaxlib knows (XLA aborts on an unknown flag, and upgrades drop
  some: jax 0.12's XLA has no --xla_cpu_use_fusion_emitters, and one unknown flag used to
  cost the whole set, the suite then compiling at XLA's defaults). Checked once per test
  session, the whole set and, where it is refused, each flag alone (the answer reaches
  pytest-xdist's workers in the environment)."""
  if "KSTORE_TEST_FAST_FLAGS" not in os.environ:
    known = (FAST_COMPILE_FLAGS if _accepted(FAST_COMPILE_FLAGS)
             else [f for f in FAST_COMPILE_FLAGS if _accepted((f,))])
    os.environ["KSTORE_TEST_FAST_FLAGS"] = " ".join(known)
  return os.environ["KSTORE_TEST_FAST_FLAGS"]


def _accepted(flags) -> bool:
  """Whether a process with XLA_FLAGS=`flags` computes (XLA aborts on a flag it does not know)."""
  return subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).sum()"],
                        env={**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"},
                        capture_output=True, check=False).returncode == 0


# XLA's defaults back, for one in-process program whose time is its steps (the pytest processes
# compile with fast_compile_flags): a per-compilation override of those flags. Measured, the
# 200 memorising steps of test_trust's `stored` fixture: 18.6 -> 7.2 CPU-s, compile 2.0 -> 5.3.
def xla_defaults() -> dict:
  """XLA's defaults (FAST_COMPILE) of the fast-compile flags in use, as compile options (a
  dropped flag's would be an unknown option)."""
  in_use = {f[2:].split("=")[0] for f in fast_compile_flags().split()}
  return {k: default for k, (_, default) in FAST_COMPILE.items() if k in in_use}


def optimized_jit(fn, **kwargs):
  """jax.jit(fn, **kwargs) compiled with XLA's defaults for the fast-compile flags in use."""
  import jax   # (this module is imported before conftest sets XLA_FLAGS)
  return jax.jit(fn, compiler_options=xla_defaults() or None, **kwargs)


def env(cache=None, n_devices: int = 1, optimize: bool = False, **extra) -> dict:
  """The environment of a `python -m kstore_jax.*` subprocess: JAX on n_devices fake CPU
  devices compiling with `fast_compile_flags` (XLA's defaults if `optimize`), the persistent
  compilation cache in `cache` (conftest's `jax_cache`; every program cached, however fast it
  compiled), no cluster variables, then `extra`."""
  out = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  flags = f"--xla_force_host_platform_device_count={n_devices}"
  if not optimize:
    flags = f"{flags} {fast_compile_flags()}".strip()
  out.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  if cache is not None:
    out.update(JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  out.update(extra)
  return out


# The command that starts the suite's `python -m kstore_jax.<tool>` processes (conftest's
# `forkserver` fixture sets it): tests/forkserver.py's client, or the interpreter itself.
PYTHON_ENV = "KSTORE_TEST_PYTHON"


def python(fresh: bool = False) -> str:
  """The program a test runs `-m kstore_jax.<tool> ...` with: the fork server's client (a
  child forked from a process that has imported jax and the library: ~1.4 CPU-s less a
  process), or with `fresh` (a process the test kills with SIGKILL, or one that must start as
  the OS starts it: tests/forkserver.py says what a forked child cannot be) the interpreter."""
  return sys.executable if fresh else os.environ.get(PYTHON_ENV, sys.executable)


def run_main(args, cache, n_devices=1, timeout=300, **extra) -> subprocess.CompletedProcess:
  """`python -m kstore_jax.main ARGS` on n_devices fake CPU devices with the persistent JAX
  compilation cache in `cache` (and the environment variables `extra`: `env`)."""
  return subprocess.run([python(), "-m", "kstore_jax.main", *args], cwd=ROOT,
                        env=env(cache, n_devices, **extra), capture_output=True, text=True,
                        timeout=timeout, check=False)
