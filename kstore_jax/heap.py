"""Keep freed memory in the process instead of returning it to the kernel (glibc only).

XLA:CPU allocates each executable's temporaries (1.2 GB for one `small` block's forward and
backward, several GB for a train step) with malloc on every call and frees them after. glibc
serves a request that large from a fresh anonymous mmap and unmaps it on free (a worker
thread's arena falls back to mmap for anything above its 64 MB heap whatever the mmap
threshold), so every step page-faults its whole working set in again (~325k faults for one
`small` block) and the kernel zeroes each page: ~19% of a `small` train step on the 2-core
CPU, 13% at tiny (BENCHMARKS.md).

`retain_freed_memory()` sets, through mallopt: one arena (threads share the main, brk-grown
heap), no mmap for large blocks, no trimming of the heap's top. The process's resident size
then stays at its peak, and later steps reuse the pages. It runs when `kstore_jax` is first
imported, before JAX starts its thread pools, on machines where jax computes on the CPU
(`cpu_only`); `KSTORE_JAX_RETAIN_MEMORY=0` turns it off. A no-op where libc has no mallopt
(macOS, musl).

That reuse needs each step's temporaries freed before the next step allocates them. jax
queues a CPU computation to a worker thread by default, and the worker starts the next step
as soon as the previous one's outputs are ready, a few milliseconds before it frees that
step's temporaries (one block: 5.3 GB at `small`): both blocks then live at once, the one
heap fragments, and `small` peaked at 17-20 GB against 6.3 GB. So the compute commands
(main, grid, bench) also run one-device computations in the calling thread
(`dispatch_inline`, jax's `jax_cpu_enable_async_dispatch` off): a step's block is freed when
the call returns, and the next step gets the same pages back. Retention is still bounded
(`Bound`, called by the training loop and the train benchmark): glibc's defaults come back
when a process grows past RETAIN_MAX_GROWTH of its size after its first step (and by more
than RETAIN_SLACK_BYTES), or, where steps are queued (a mesh of several devices, or a
process that left dispatch as it was), when that first step leaves it above
RETAIN_MAX_SHARE of the machine's memory.

Huge pages (`use_huge_pages`, the first call of the compute commands' `run()`: `python -m
kstore_jax.main | grid | bench`): glibc >= 2.35 asks the kernel for transparent huge pages
(2 MiB) on the memory malloc maps when the process starts with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, which only the environment a process starts with can
set, so the command re-executes itself once with it. A step's temporaries then fault in 2 MiB
at a time, 512 times fewer faults (the first step's, and every step's where the retention is
released), and TLB misses fall: at `small` the same-process matmul reference runs at 210
GFLOP/s against 187 without them, the retained step at 11.8 s against 12.0 (BENCHMARKS.md,
session 45). Where the kernel's THP mode is `madvise` (with `always` every process has them
already, with `never` none can), on CPU-only machines;
`KSTORE_JAX_HUGE_PAGES=0` turns it off (the test suite does: its processes are a few seconds
of compiling, and touching fresh 2 MiB pages costs them ~1 s each).
"""

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8


# Device nodes of accelerators jax would use instead of the CPU (NVIDIA GPUs; AMD GPUs, ROCm;
# TPU VMs)
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")


def cpu_only() -> bool:
  """Whether jax will compute on the CPU: JAX_PLATFORMS says cpu, or no accelerator device
  node exists. Decided before jax starts (asking jax would start it)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(os.path.exists(p) for p in ACCELERATOR_NODES)


def retain_freed_memory() -> bool:
  """Returns whether the settings were applied: on CPU-only machines (on an accelerator the
  device memory has its own allocator, and one malloc arena would serialise the compiler's
  and runtime's threads); `KSTORE_JAX_RETAIN_MEMORY=0` turns it off, `=1` forces it."""
  flag = os.environ.get("KSTORE_JAX_RETAIN_MEMORY", "")
  if flag == "0" or (flag != "1" and not cpu_only()):
    return False
  # -1 as the trim threshold is SIZE_MAX inside glibc: never give the top of the heap back
  return _mallopt((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def _mallopt(*settings: tuple[int, int]) -> bool:
  """Apply glibc mallopt (param, value) settings; whether every one was accepted (False where
  libc has no mallopt)."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in settings)


# Retention stops (glibc's defaults come back) once the process has grown past this multiple
# of its resident size after the first step, and by more than RETAIN_SLACK_BYTES: freed blocks
# would be fragmenting the one heap. (The slack: a tiny run's first checkpoint save alone
# took a 0.68 GiB process to 0.94.)
RETAIN_MAX_GROWTH = 1.25
RETAIN_SLACK_BYTES = 1 << 30
# ... and, where steps are queued rather than run inline (dispatch_inline), once the first
# step leaves it above this share of the machine's memory: queued, each step's temporaries
# outlive the next step's start, and `small` grew to 17-20 GB against 6.3 GB by its third step.
RETAIN_MAX_SHARE = 0.2


class Bound:
  """Bounded retention: call `after_step()` after every train step. After the first, the
  process's resident size is the reference; the retention is released (glibc's defaults
  restored: large blocks mmapped and unmapped on free, the heap trimmed, the freed pages handed
  back, one line said on stderr) when a later step leaves the process above
  RETAIN_MAX_GROWTH of it and RETAIN_SLACK_BYTES beyond it, or, for steps not run `inline`
  (see dispatch_inline), when the first leaves it above RETAIN_MAX_SHARE of the machine's
  memory. A released process page-faults each step's temporaries again (the tweak's gain is
  lost) but stays near the default allocator's peak. A no-op when the settings were not
  applied."""

  def __init__(self, applied: bool, inline: bool):
    self.applied, self.inline = applied, inline
    self.first, self.done, self.released = None, False, False

  def after_step(self) -> None:
    if not self.applied or self.done:
      return
    size = resident_bytes()
    if self.first is None:
      self.first = size
      if self.inline or size <= RETAIN_MAX_SHARE * os.sysconf("SC_PHYS_PAGES") * os.sysconf(
          "SC_PAGE_SIZE"):
        return
      limit = f"{RETAIN_MAX_SHARE:.0%} of the machine's memory"
    elif size > max(RETAIN_MAX_GROWTH * self.first, self.first + RETAIN_SLACK_BYTES):
      limit = (f"{RETAIN_MAX_GROWTH}x and {RETAIN_SLACK_BYTES / 2**30:.2f} GiB more than its "
               f"{self.first / 2**30:.2f} GiB after the first step")
    else:
      return
    self.done, self.released = True, restore_defaults()
    print(f"kstore_jax.heap: {size / 2**30:.2f} GiB resident, above {limit}: freed memory "
          "goes back to the system from now on (steps page-fault their temporaries again)",
          file=sys.stderr, flush=True)


# jax's option: False runs a CPU computation of one device in the thread that calls it; jax's
# default (True) queues it to a worker thread and returns at once.
ASYNC_DISPATCH = "jax_cpu_enable_async_dispatch"


def dispatch_inline(retained: bool) -> bool:
  """Where the heap is retained (`retained`: kstore_jax.RETAINS_FREED_MEMORY), make jax run
  each one-device CPU computation in the calling thread, so that a step's temporaries are
  freed before the next step allocates them (the module's docstring); whether it did. Call
  before jax computes anything: its CPU client reads the option when it starts.
  `KSTORE_JAX_INLINE=0` leaves jax's queued dispatch (the retention is then bounded by
  RETAIN_MAX_SHARE)."""
  if not retained or os.environ.get("KSTORE_JAX_INLINE", "") == "0":
    return False
  import jax
  jax.config.update(ASYNC_DISPATCH, False)
  return True


def steps_inline(n_devices: int) -> bool:
  """Whether a step on `n_devices` devices runs in the calling thread: one device, and jax's
  queued dispatch off (dispatch_inline); computations over several devices are always queued."""
  import jax
  try:
    queued = jax.config.read(ASYNC_DISPATCH)
  except AttributeError:   # a jax without the option queues every computation
    queued = True
  return n_devices == 1 and not queued


# After a release: blocks from MMAP_THRESHOLD up are mmapped and unmapped on free, the heap's
# top trimmed beyond twice that. glibc's default threshold is dynamic (128 KiB, raised to the
# largest freed mmapped block up to 32 MiB on 64-bit); any mallopt of these fixes it, so the
# release sets the dynamic one's steady state rather than its 128 KiB start (which mmaps and
# faults in every block of 128 KiB to 32 MiB on every call: BENCHMARKS.md).
MMAP_THRESHOLD = 32 << 20


def restore_defaults() -> bool:
  """glibc's allocation settings back (large blocks mmapped, the heap trimmed:
  MMAP_THRESHOLD) and the freed pages handed back; whether it worked. The arenas stay one:
  glibc takes M_ARENA_MAX 0 (its default) without undoing a limit threads have allocated
  under (what the bound guards against is the retained pages, which this releases)."""
  ok = _mallopt((M_ARENA_MAX, 0), (M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                (M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD))
  ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
  return ok


def resident_bytes() -> int:
  """This process's resident set size (/proc/self/statm)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
  """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`; '' if unknown)."""
  try:
    with open(THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return ""
  return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def glibc_version() -> tuple[int, ...]:
  """(major, minor) of the C library if it is glibc, else ()."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (ValueError, OSError, AttributeError):   # no such confstr name (macOS, musl)
    return ()
  return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else ()


def huge_pages_env(environ=None) -> dict | None:
  """The environment to re-execute this process in so that malloc uses huge pages, or None
  when there is nothing to gain: turned off (KSTORE_JAX_HUGE_PAGES=0), already asked for, not
  a CPU-only machine, a libc without the tunable, or a THP mode other than `madvise`."""
  env = os.environ if environ is None else environ
  tunables = env.get("GLIBC_TUNABLES", "")
  if (env.get("KSTORE_JAX_HUGE_PAGES", "") == "0" or "glibc.malloc.hugetlb" in tunables
      or not cpu_only() or glibc_version() < (2, 35) or thp_mode() != "madvise"):
    return None
  return {**env, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)}


def huge_pages_asked() -> bool:
  """Whether this process started with malloc on huge pages (GLIBC_TUNABLES)."""
  return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def use_huge_pages() -> None:
  """Re-execute this process (the same interpreter, options and arguments) with malloc on
  huge pages, where `huge_pages_env` says it helps; call it first thing in a command, before
  anything is printed, started or changed in sys.argv. Returns only when no re-execution is
  needed (or this is the re-executed process, or one that cannot be replayed: a program
  read from stdin or `-c`, an interactive interpreter)."""
  env = huge_pages_env()
  if env is not None and os.path.isfile(sys.argv[0]):   # a script or `-m` module
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
