"""What several test files share.

- One persistent JAX compilation cache for every subprocess of the session (identical programs
  compile to identical executables, so it changes no number; a program one file's run compiled
  is loaded by the next file's instead of compiled again). Under pytest-xdist (launch/test.sh
  runs `-n auto --dist loadfile`) the workers share it too. The subprocess environment that
  points a run at it is `runs.env`.
- XLA:CPU's fast-compile flags (runs.fast_compile_flags) for the pytest processes and every
  subprocess: the suite's time is mostly compiling; a test whose time is its steps asks for
  XLA's defaults (`runs.env(optimize=True)`: test_demo_fast).
- No huge-page re-execution (heap.use_huge_pages) in the suite's `python -m` subprocesses:
  they are seconds of compiling, where fresh 2 MiB pages cost ~1 s each and gain nothing
  (test_heap.py turns it back on where it tests it).
- The order files are handed to xdist workers: the longest first (longest-processing-time
  scheduling), so that no long file starts last while the other worker sits idle. Durations are
  the `--durations` figures of a 2-core CI run; a file not listed keeps its place after them.
"""

import os
import shlex
import subprocess
import sys

import pytest

import runs

# The pytest processes' own JAX (in-process tests: one device) compiles with the subprocesses'
# flags; set before any test module imports jax (pytest-xdist's workers inherit
# them from the controller's environment).
_FLAGS = runs.fast_compile_flags()
if _FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAGS}".strip()

os.environ["KSTORE_JAX_HUGE_PAGES"] = "0"

# Longest first: seconds of one 2-core run of the whole suite (session 13), whole file.
LONGEST_FIRST = (
    "test_demo_fast.py", "test_multiprocess.py", "test_grid.py", "test_train.py",
    "test_device_check.py", "test_tools.py", "test_eval.py", "test_trust.py", "test_gbert.py",
    "test_probes.py", "test_fast_paths.py", "test_main_errors.py", "test_cli_data.py",
    "test_lower.py",
)


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  # an xdist worker's basetemp is <run>/popen-gwN: the cache sits beside them, in <run>
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope="session", autouse=True)
def build_caches(jax_cache):
  """What every process of the run (this one's and every subprocess's: they inherit the
  variables) builds once and keeps, in directories beside the compilation cache, not the
  user's ~/.cache: the generated tokenizers and the CPU attention kernel's library."""
  from kstore_jax.data import tokenizer
  from kstore_jax.model import cpu_attention
  envs = {tokenizer.CACHE_ENV: "tokenizer_cache", cpu_attention.CACHE_ENV: "kernel_cache"}
  for env, name in envs.items():
    os.environ[env] = str(jax_cache.parent / name)
  yield
  for env in envs:
    del os.environ[env]


@pytest.fixture(scope="session", autouse=True)
def forkserver(jax_cache, build_caches, tmp_path_factory):
  """tests/forkserver.py's server for this pytest process, started with the environment of
  the suite's subprocesses (runs.env), and the client it answers as runs.python():
  `python -m kstore_jax.<tool>` children forked from it instead of each importing jax and the
  library again. KSTORE_TEST_FORKSERVER=0: none (every process the interpreter)."""
  del build_caches   # (in the environment the server keeps)
  if os.environ.get("KSTORE_TEST_FORKSERVER") == "0":
    yield None
    return
  name = f"kstore-forkserver-{os.getpid()}"
  script = runs.ROOT / "tests" / "forkserver.py"
  server = subprocess.Popen([sys.executable, str(script), "--serve", name], cwd=runs.ROOT,
                            env=runs.env(jax_cache), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
  line = server.stdout.readline()
  assert line == "ready\n", f"the fork server did not start: {line!r}"
  client = tmp_path_factory.getbasetemp() / "python"
  client.write_text(f"#!/bin/sh\nexec {shlex.join([sys.executable, '-I', '-S', str(script), name])}"
                    ' "$@"\n')
  client.chmod(0o755)
  os.environ[runs.PYTHON_ENV] = str(client)
  yield client
  del os.environ[runs.PYTHON_ENV]
  server.stdin.close()
  server.wait(timeout=60)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: order kept within
