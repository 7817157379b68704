"""What several test files share: one persistent JAX compilation cache for every subprocess of
the session (identical programs compile to identical executables, so it changes no number; a
program one file's run compiled is loaded by the next file's instead of compiled again). The
subprocess environment that points a run at it is `runs.env`."""

import pytest


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  path = tmp_path_factory.getbasetemp() / "jax_cache"
  path.mkdir(exist_ok=True)
  return path
