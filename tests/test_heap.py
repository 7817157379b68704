"""kstore_jax.heap: importing the package makes freed large blocks reusable without page faults."""

import ctypes
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, resource, sys
import kstore_jax
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 256 << 20
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kstore_jax.RETAINS_FREED_MEMORY, faults[1], faults[2])
"""

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt settings are glibc's")


def run_probe(retain: str, prelude: str = "") -> tuple[bool, int, int]:
  env = {**os.environ, "KSTORE_JAX_RETAIN_MEMORY": retain}
  probe = PROBE.replace("n = 256 << 20\n", prelude + "n = 256 << 20\n")
  out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0] == "True", int(out[1]), int(out[2])


@glibc
def test_freed_blocks_are_reused_without_faults():
  pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  applied, second, third = run_probe("1")
  assert applied
  assert second < pages // 20 and third < pages // 20, (second, third, pages)
  # the control: glibc's default unmaps the block on free, so each round faults it in again
  applied, second, third = run_probe("0")
  assert not applied
  assert second > pages // 2 and third > pages // 2, (second, third, pages)


def test_no_mallopt_is_a_no_op(monkeypatch):
  from kstore_jax import heap

  class NoMallopt:
    def __getattr__(self, name):
      raise AttributeError(name)

  monkeypatch.setattr(ctypes, "CDLL", lambda name: NoMallopt())
  assert heap.retain_freed_memory() is False


@glibc
def test_a_large_process_gets_the_default_allocator_back():
  """heap.Bound: when the first step leaves the process above RETAIN_MAX_SHARE of the
  machine's memory, glibc's defaults come back: freed large blocks are unmapped again (each
  round faults its pages in), as without the tweak; below the share nothing changes."""
  pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  release = ("from kstore_jax import heap\nheap.RETAIN_MAX_SHARE = 0.0\n"
             "b = heap.Bound(True)\nb.after_step()\nassert b.released\n")
  applied, second, third = run_probe("1", release)
  assert applied and second > pages // 2 and third > pages // 2, (second, third, pages)
  keep = ("from kstore_jax import heap\nheap.RETAIN_MAX_SHARE = 1.0\n"
          "b = heap.Bound(True)\nb.after_step()\nassert not b.released\n")
  applied, second, third = run_probe("1", keep)
  assert applied and second < pages // 20 and third < pages // 20, (second, third, pages)
