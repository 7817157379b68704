"""Process set-up shared by the command-line tools that train (main, grid): joining a
multi-process JAX cluster and the persistent compilation cache."""

import os


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
