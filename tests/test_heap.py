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


HUGE_PROBE = r"""
import ctypes
from kstore_jax import heap
heap.use_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
n = 256 << 20
ctypes.memset(libc.malloc(n), 1, n)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
huge = [l for l in rollup if l.startswith("AnonHugePages:")][0]
print(heap.huge_pages_asked(), int(huge.split()[1]) << 10, n)
"""


@glibc
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="no smaps_rollup")
@pytest.mark.parametrize("retain", ["1", "0"])
def test_use_huge_pages_puts_malloc_on_huge_pages(retain):
  """heap.use_huge_pages re-executes the process with glibc.malloc.hugetlb=1: a 256 MiB block
  (from the retained heap, or mmapped without the retention) then lies on 2 MiB pages; with
  KSTORE_JAX_HUGE_PAGES=0 nothing changes and none does (THP mode `madvise`: only advised
  memory gets them)."""
  from kstore_jax import heap
  if heap.thp_mode() != "madvise" or heap.glibc_version() < (2, 35):
    pytest.skip(f"THP mode {heap.thp_mode()!r}, glibc {heap.glibc_version()}")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(KSTORE_JAX_RETAIN_MEMORY=retain, JAX_PLATFORMS="cpu")

  def probe(flag):
    out = subprocess.run([sys.executable, "-c", HUGE_PROBE], check=True, capture_output=True,
                         text=True, env={**env, "KSTORE_JAX_HUGE_PAGES": flag}).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])

  asked, huge, n = probe("")
  assert asked and huge >= n // 2, (huge, n)
  asked, huge, n = probe("0")
  assert not asked and huge == 0, huge


def test_huge_pages_only_where_they_help(monkeypatch):
  """huge_pages_env: no re-execution when turned off, already asked for, off the CPU, without
  glibc >= 2.35 or outside THP mode `madvise`; otherwise the tunable is added to the others."""
  from kstore_jax import heap
  monkeypatch.setattr(heap, "cpu_only", lambda: True)
  monkeypatch.setattr(heap, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(heap, "thp_mode", lambda: "madvise")
  env = heap.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
  assert heap.huge_pages_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert heap.huge_pages_env({"KSTORE_JAX_HUGE_PAGES": "0"}) is None
  assert heap.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  for name, value in (("thp_mode", lambda: "always"), ("thp_mode", lambda: "never"),
                      ("glibc_version", lambda: (2, 34)), ("glibc_version", lambda: ()),
                      ("cpu_only", lambda: False)):
    with monkeypatch.context() as m:
      m.setattr(heap, name, value)
      assert heap.huge_pages_env({}) is None, name
