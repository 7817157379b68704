#!/usr/bin/env bash
# The tiny CPU demo: install (once) into .venv, then pretrain -> QA finetune -> eval the
# `single` and `multi5_permute` bioS rows at the tiny scale, probe them (P- and Q-probing),
# and write the report.
#   bash launch/local.sh [OUTDIR]          (default runs/tiny)
# Rerunning resumes: finished stages are skipped, an interrupted one continues.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
OUT="${1:-runs/tiny}"
[ -z "${1:-}" ] || case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac   # _venv.sh cds to the repo
# shellcheck source=_venv.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" ""   # "": no extras (not this script's args)
ROWS=(single multi5_permute)
start=$(date +%s)
for row in "${ROWS[@]}"; do
  echo "== $row =="
  python -m kstore_jax.main --config="configs/$row.py:tiny,probe" --workdir="$OUT/$row"
done
python -m kstore_jax.report "${ROWS[@]/#/$OUT/}" --out="$OUT/report.md"
echo "demo finished in $(( $(date +%s) - start )) s; report: $OUT/report.md"
