# shellcheck shell=bash
# Sourced by the launch scripts: create .venv (Python 3.11+) and install the project into it
# once; later runs reuse it (reinstalling only when setup.cfg changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KSTORE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.kstore_installed${EXTRAS:+_$EXTRAS}"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.cfg" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$STAMP"
fi
# The project's own bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (this image
# sets it) every process would otherwise compile the package's sources again (~0.3 CPU-s a
# process; the test suite starts ~180). compileall rewrites only stale files (0.05 s when all
# are current) and prints only errors.
"$VENV/bin/python" -m compileall -q "$ROOT/kstore_jax" "$ROOT/configs"
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
