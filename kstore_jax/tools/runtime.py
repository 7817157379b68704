"""Process set-up shared by the command-line tools that train (main, grid, bench): joining a
multi-process JAX cluster, the persistent compilation cache, pinning to one CPU core."""

import os

PIN_CORE = "KSTORE_GRID_CORE"   # a grid's processes mode: the CPU core a child runs on


def pin_to_core_from_env() -> None:
  """Run on the core PIN_CORE names, if set (call before JAX sizes its thread pool from the
  usable cores, i.e. before it computes anything)."""
  if PIN_CORE in os.environ:
    os.sched_setaffinity(0, {int(os.environ[PIN_CORE])})


def maybe_initialize_distributed() -> None:
  """Multi-process runs (TPU pods, SLURM, or KSTORE_NUM_PROCESSES) join one JAX cluster."""
  import jax
  if any(v in os.environ for v in ("KSTORE_NUM_PROCESSES", "SLURM_NTASKS", "TPU_WORKER_ID",
                                   "JAX_COORDINATOR_ADDRESS")):
    n = int(os.environ.get("KSTORE_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", "0")) or 0)
    if n == 1:
      return
    kwargs = {}
    if "KSTORE_NUM_PROCESSES" in os.environ:
      kwargs = dict(coordinator_address=os.environ["KSTORE_COORDINATOR"], num_processes=n,
                    process_id=int(os.environ["KSTORE_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


def use_compile_cache(path: str) -> None:
  """jax's persistent compilation cache in `path` (train.compile_cache; '' = off), unless the
  environment names one already (JAX_COMPILATION_CACHE_DIR): reruns, resumed stages and the
  rows of a grid that share shapes then load their executables instead of compiling them."""
  import jax
  if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
