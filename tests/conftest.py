"""What several test files share.

- One persistent JAX compilation cache for every subprocess of the session (identical programs
  compile to identical executables, so it changes no number; a program one file's run compiled
  is loaded by the next file's instead of compiled again). Under pytest-xdist (launch/test.sh
  runs `-n auto --dist loadfile`) the workers share it too. The subprocess environment that
  points a run at it is `runs.env`.
- The order files are handed to xdist workers: the longest first (longest-processing-time
  scheduling), so that no long file starts last while the other worker sits idle. Durations are
  the `--durations` figures of a 2-core CI run; a file not listed keeps its place after them.
"""

import os

import pytest

# Longest first: seconds of one 2-core CI run (session 10), whole file.
LONGEST_FIRST = (
    "test_demo_fast.py", "test_multiprocess.py", "test_grid.py", "test_gbert.py",
    "test_eval.py", "test_device_check.py", "test_train.py", "test_intervals.py",
    "test_import.py", "test_trust.py", "test_probes.py", "test_groups.py", "test_tools.py",
    "test_fast_paths.py",
)


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  # an xdist worker's basetemp is <run>/popen-gwN: the cache sits beside them, in <run>
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
  path.mkdir(exist_ok=True)
  return path


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: order kept within
