#!/usr/bin/env bash
# The tiny CPU demo: install (once) into .venv, then pretrain -> QA finetune -> eval the
# `single` and `multi5_permute` bioS rows at the tiny scale as one grid, probe them (P- and
# Q-probing), and write the report.
#   bash launch/local.sh [OUTDIR]          (default runs/tiny)
# Rerunning resumes: finished stages are skipped, an interrupted one continues.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
case "${1:-}" in -*) echo "local.sh: unknown option '$1' (usage: bash launch/local.sh [OUTDIR])" >&2
                    exit 2 ;; esac
[ $# -le 1 ] || { echo "local.sh: unexpected argument '$2' (usage: bash launch/local.sh [OUTDIR])" >&2; exit 2; }
OUT="${1:-runs/tiny}"
[ -z "${1:-}" ] || case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac   # _venv.sh cds to the repo
# shellcheck source=_venv.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" ""   # "": no extras (not this script's args)
start=$(date +%s)
# the two arms as one grid (configs/grids/demo.py): on a CPU each run in its own process
# pinned to a core, side by side (grid.mode auto); on a GPU one vmapped step
python -m kstore_jax.grid --config=configs/grids/demo.py:tiny --workdir="$OUT"
python -m kstore_jax.report "$OUT" --out="$OUT/report.md"
echo "demo finished in $(( $(date +%s) - start )) s; report: $OUT/report.md"
