"""Process set-up shared by the command-line tools that train (main, grid, bench): joining a
multi-process JAX cluster, the persistent compilation cache, pinning to one CPU core."""

import os

import kstore_jax
from kstore_jax import heap
from kstore_jax.errors import ConfigError

PIN_CORE = "KSTORE_GRID_CORE"   # a grid's processes mode: the CPU core a child runs on
PARENT = "KSTORE_GRID_PARENT"   # ... and the pid of the grid process that started it


def prepare_process() -> None:
  """First thing in a compute command's `run()` (main, grid, bench), before anything is
  printed or computed: on a CPU, malloc on huge pages (heap.use_huge_pages: a re-execution of
  the process) and, with the retained heap, one-device computations run in the calling thread
  (heap.dispatch_inline)."""
  heap.use_huge_pages()
  heap.dispatch_inline(kstore_jax.RETAINS_FREED_MEMORY)


def pin_to_core_from_env() -> None:
  """Run on the core PIN_CORE names, if set (call before JAX sizes its thread pool from the
  usable cores, i.e. before it computes anything); such a grid child also ends with its
  parent (die_with_parent)."""
  if PIN_CORE in os.environ:
    os.sched_setaffinity(0, {int(os.environ[PIN_CORE])})
    die_with_parent()


def is_grid_child() -> bool:
  """Whether this process is a grid's processes-mode child (its parent owns grid.json)."""
  return PIN_CORE in os.environ


def die_with_parent() -> None:
  """SIGTERM to this process when the process that started it dies, however it dies (kill -9
  included): a grid child then saves where it is and exits (the train loop's SIGTERM save),
  its workdir unlocked for the rerun. Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
  import ctypes
  import signal
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
  except (OSError, AttributeError):
    return
  if str(os.getppid()) != os.environ.get(PARENT, str(os.getppid())):
    os.kill(os.getpid(), signal.SIGTERM)   # the parent was gone before the request


def maybe_initialize_distributed() -> None:
  """Multi-process runs (TPU pods, SLURM, or KSTORE_NUM_PROCESSES) join one JAX cluster. A
  SLURM allocation of several tasks whose process srun did not start (a batch script's or an
  salloc shell's: no SLURM_STEP_NODELIST, which jax's SLURM cluster reads) is refused in one
  line: jax would find no cluster and stop with a traceback, or its peers would never come."""
  import jax
  if any(v in os.environ for v in ("KSTORE_NUM_PROCESSES", "SLURM_NTASKS", "TPU_WORKER_ID",
                                   "JAX_COORDINATOR_ADDRESS")):
    n = _env_int("KSTORE_NUM_PROCESSES" if "KSTORE_NUM_PROCESSES" in os.environ
                 else "SLURM_NTASKS", 0)
    if n == 1:
      return
    kwargs = {}
    if "KSTORE_NUM_PROCESSES" in os.environ:
      if "KSTORE_COORDINATOR" not in os.environ:
        raise ConfigError(f"KSTORE_NUM_PROCESSES={n} needs KSTORE_COORDINATOR (host:port of "
                          "process 0) and KSTORE_PROCESS_ID")
      kwargs = dict(coordinator_address=os.environ["KSTORE_COORDINATOR"], num_processes=n,
                    process_id=_env_int("KSTORE_PROCESS_ID", None))
    elif (n > 1 and "SLURM_STEP_NODELIST" not in os.environ
          and not any(v in os.environ for v in ("TPU_WORKER_ID", "JAX_COORDINATOR_ADDRESS"))):
      raise ConfigError(
          f"SLURM_NTASKS={n} but srun did not start this process (no SLURM_STEP_NODELIST): "
          f"start one process a task with srun (launch/slurm_gpu.sh does), or set "
          f"KSTORE_NUM_PROCESSES=1 to run this one alone")
    jax.distributed.initialize(**kwargs)


def _env_int(name: str, default: int | None) -> int:
  """Environment variable `name` as a whole number >= 0 (`default` where unset or empty;
  None: required): ConfigError naming it otherwise."""
  text = os.environ.get(name, "")
  if not text and default is not None:
    return default
  if not text.strip().isdigit():
    raise ConfigError(f"{name}={text!r} must be a whole number >= 0")
  return int(text)


def use_compile_cache(path: str) -> None:
  """jax's persistent compilation cache in `path` (train.compile_cache; '' = off), unless the
  environment names one already (JAX_COMPILATION_CACHE_DIR): reruns, resumed stages and the
  rows of a grid that share shapes then load their executables instead of compiling them."""
  import jax
  if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
