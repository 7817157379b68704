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
"""

import ctypes
import os

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


# Device nodes of accelerators jax would use instead of the CPU (NVIDIA GPUs; TPU VMs)
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0")


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
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 as the trim threshold is SIZE_MAX inside glibc: never give the top of the heap back
  return all(mallopt(param, value) == 1
             for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
