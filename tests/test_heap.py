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
  """heap.Bound: for steps queued to a worker (`inline` False), a first step that leaves the
  process above RETAIN_MAX_SHARE of the machine's memory brings glibc's defaults back: freed
  large blocks are unmapped again (each round faults its pages in), as without the tweak;
  below the share, or for steps run inline, nothing changes."""
  pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  release = ("from kstore_jax import heap\nheap.RETAIN_MAX_SHARE = 0.0\n"
             "b = heap.Bound(True, inline=False)\nb.after_step()\nassert b.released\n")
  applied, second, third = run_probe("1", release)
  assert applied and second > pages // 2 and third > pages // 2, (second, third, pages)
  for keep in ("heap.RETAIN_MAX_SHARE = 1.0\nb = heap.Bound(True, inline=False)\n",
               "heap.RETAIN_MAX_SHARE = 0.0\nb = heap.Bound(True, inline=True)\n"):
    keep = f"from kstore_jax import heap\n{keep}b.after_step()\nassert not b.released\n"
    applied, second, third = run_probe("1", keep)
    assert applied and second < pages // 20 and third < pages // 20, (second, third, pages)


@glibc
def test_a_growing_process_gets_the_default_allocator_back():
  """heap.Bound: a later step that leaves the process above RETAIN_MAX_GROWTH of its size
  after the first step, and RETAIN_SLACK_BYTES beyond it, releases the retention (then each
  round faults its pages in again); growth within either bound keeps it."""
  pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  grow = ("from kstore_jax import heap\nheap.RETAIN_MAX_GROWTH = {}\n"
          "heap.RETAIN_SLACK_BYTES = {}\n"
          "b = heap.Bound(True, inline=True)\nb.after_step()\n"
          "held = b'x' * (512 << 20)\nb.after_step()\nassert b.released is {}\n")
  applied, second, third = run_probe("1", grow.format(1.5, 0, True))
  assert applied and second > pages // 2 and third > pages // 2, (second, third, pages)
  for growth, slack in ((1000.0, 0), (1.5, 1 << 30)):
    applied, second, third = run_probe("1", grow.format(growth, slack, False))
    assert applied and second < pages // 20 and third < pages // 20, (second, third, pages)


STEP_PROBE = r"""
import resource, sys
import kstore_jax
from kstore_jax import heap
inline = heap.dispatch_inline(kstore_jax.RETAINS_FREED_MEMORY) if sys.argv[1] == "inline" else False
import jax, jax.numpy as jnp

@jax.jit
def step(x):
  y = jnp.sin(x) * 2.0   # a temporary: read twice, once reversed
  return (jnp.cos(y)[::-1] * y).sum() + y.max()

x = jnp.ones((1 << 24,), jnp.float32)   # 64 MiB
ready = step(x).is_ready()   # right after the call: inline, it has run
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(step(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(inline, ready, *faults)
"""


@glibc
def test_steps_run_inline_reuse_their_temporaries():
  """heap.dispatch_inline: with the heap retained, jax runs a computation in the calling thread
  (its result is ready when the call returns; queued, as by jax's default, it is not), so its
  temporaries (64 MiB here) are freed before the next call allocates them and the next call
  gets the same pages back: the calls fault in a third of what glibc's default does at most,
  whereas queued calls start before the last one's temporaries are freed and keep fresh
  blocks coming in most processes (a race: not asserted)."""
  pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
  env = {**os.environ, "KSTORE_JAX_RETAIN_MEMORY": "1", "JAX_PLATFORMS": "cpu"}

  def probe(mode):
    out = subprocess.run([sys.executable, "-c", STEP_PROBE, mode], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", out[1] == "True", [int(n) for n in out[2:]]

  inline, ready, faults = probe("inline")
  assert inline and ready
  # two such temporaries a call: glibc's default faults in 24 blocks over the twelve calls;
  # retained, a few at most (a freed block that a small allocation took a piece of is too
  # small for the next call's: the heap grows until it has room, then stays)
  assert sum(faults) < 8 * pages, faults
  inline, ready, _ = probe("queued")
  assert not inline and not ready


def test_steps_inline_only_where_retained(monkeypatch):
  """dispatch_inline changes nothing without the retained heap or with KSTORE_JAX_INLINE=0;
  steps_inline: one device and jax's queued dispatch off (several devices are always queued)."""
  from kstore_jax import heap
  import jax
  queued = jax.config.read(heap.ASYNC_DISPATCH)
  try:
    jax.config.update(heap.ASYNC_DISPATCH, False)
    assert heap.steps_inline(1) and not heap.steps_inline(2)
    jax.config.update(heap.ASYNC_DISPATCH, True)
    assert not heap.steps_inline(1)
  finally:
    jax.config.update(heap.ASYNC_DISPATCH, queued)
  seen = []
  monkeypatch.setattr(jax.config, "update", lambda name, value: seen.append((name, value)))
  assert heap.dispatch_inline(False) is False and not seen
  monkeypatch.setenv("KSTORE_JAX_INLINE", "0")
  assert heap.dispatch_inline(True) is False and not seen
  monkeypatch.delenv("KSTORE_JAX_INLINE")
  assert heap.dispatch_inline(True) is True and seen == [(heap.ASYNC_DISPATCH, False)]


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
def test_use_huge_pages_puts_malloc_on_huge_pages(retain, tmp_path):
  """heap.use_huge_pages re-executes the process with glibc.malloc.hugetlb=1: a 256 MiB block
  (from the retained heap, or mmapped without the retention) then lies on 2 MiB pages; with
  KSTORE_JAX_HUGE_PAGES=0 nothing changes and none does (THP mode `madvise`: only advised
  memory gets them). A program that cannot be replayed (`-c`, stdin) is not re-executed: it
  ran on, or re-executed it lost its code and exited 0 having done nothing."""
  from kstore_jax import heap
  if heap.thp_mode() != "madvise" or heap.glibc_version() < (2, 35):
    pytest.skip(f"THP mode {heap.thp_mode()!r}, glibc {heap.glibc_version()}")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(KSTORE_JAX_RETAIN_MEMORY=retain, JAX_PLATFORMS="cpu")

  script = tmp_path / "probe.py"
  script.write_text(HUGE_PROBE)

  def probe(flag, program=(str(script),)):
    out = subprocess.run([sys.executable, *program], check=True, capture_output=True,
                         text=True, env={**env, "KSTORE_JAX_HUGE_PAGES": flag}).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])

  asked, huge, n = probe("")
  assert asked and huge >= n // 2, (huge, n)
  asked, huge, n = probe("0")
  assert not asked and huge == 0, huge
  asked, huge, n = probe("", ("-c", HUGE_PROBE))
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
