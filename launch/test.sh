#!/usr/bin/env bash
# Install (once) into .venv and run the test suite. Extra arguments go to pytest, e.g.
#   bash launch/test.sh -m slow        # the slow end-to-end checks
#   bash launch/test.sh tests/test_render.py -k span
# The files run in parallel, one pytest-xdist worker per core (KSTORE_TEST_WORKERS=N to choose,
# 0 for none), each file whole on one worker (its module fixtures run once), longest first
# (tests/conftest.py).
set -euo pipefail
# shellcheck source=_venv.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
exec python -m pytest -n "${KSTORE_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder "$@"
