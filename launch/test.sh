#!/usr/bin/env bash
# Install (once) into .venv and run the test suite. Extra arguments go to pytest, e.g.
#   bash launch/test.sh -m slow        # the slow end-to-end checks
#   bash launch/test.sh tests/test_render.py -k span
set -euo pipefail
# shellcheck source=_venv.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
exec python -m pytest "$@"
