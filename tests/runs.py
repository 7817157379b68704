"""Shared settings for tests that train through `python -m kstore_jax.main` subprocesses."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Keys that must be identical between an interrupted+resumed run and an uninterrupted one.
DETERMINISTIC = ("step", "loss", "grad_norm", "lr", "loss_tokens")


def small_run_args(steps: int, save_every: int) -> list[str]:
  """A tiny single-row pretraining run: 100 people, 2 layers of width 64, batch 8."""
  return [
      "--config.data.n_people=100", "--config.data.seq_len=160", "--config.data.vocab_size=1024",
      "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=4",
      "--config.model.d_ff=128", "--config.pretrain.batch_size=8",
      f"--config.pretrain.steps={steps}", "--config.pretrain.warmup_steps=2",
      "--config.train.log_every=1", f"--config.train.save_every={save_every}",
      "--config.stages=pretrain",
  ]


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


def env(cache=None, n_devices: int = 1, **extra) -> dict:
  """The environment of a `python -m kstore_jax.*` subprocess: JAX on n_devices fake CPU
  devices, the persistent compilation cache in `cache` (conftest's `jax_cache`; every program
  cached, however fast it compiled), no cluster variables, then `extra`."""
  out = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  out.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
             JAX_PLATFORMS="cpu")
  if cache is not None:
    out.update(JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  out.update(extra)
  return out


def run_main(args, cache, n_devices=1, timeout=300) -> subprocess.CompletedProcess:
  """`python -m kstore_jax.main ARGS` on n_devices fake CPU devices with the persistent JAX
  compilation cache in `cache`."""
  return subprocess.run([sys.executable, "-m", "kstore_jax.main", *args], cwd=ROOT,
                        env=env(cache, n_devices), capture_output=True, text=True,
                        timeout=timeout, check=False)
