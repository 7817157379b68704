#!/usr/bin/env bash
# Run an experiment on a multi-node GPU cluster with SLURM: write an sbatch script and submit it.
#   bash launch/slurm_gpu.sh [--dry-run] [--nodes=N] [--gpus-per-node=G] [--partition=P]
#       [--time=HH:MM:SS] [--account=A] --config=configs/<row>.py[:scale] --workdir=DIR
#       [-- EXTRA kstore_jax.main ARGS...]
# The job installs '.[cuda12]' into a venv (once: later jobs reuse it), then `srun` starts one
# `python -m kstore_jax.main` process per GPU (N*G in all). srun sets SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID, SLURM_STEP_NODELIST and SLURM_JOB_ID: with SLURM_NTASKS > 1, kstore_jax.main
# calls jax.distributed.initialize(), which reads them (coordinator: the first node; each
# process drives GPU number SLURM_LOCALID of its node). --dry-run prints the sbatch script and
# the sbatch command and writes and submits nothing.
#
# Environment (flags win; defaults in brackets): KSTORE_NODES [2], KSTORE_GPUS_PER_NODE [8],
# KSTORE_PARTITION, KSTORE_TIME [04:00:00], KSTORE_ACCOUNT, KSTORE_JOB_NAME [kstore],
# KSTORE_CPUS_PER_TASK [8], KSTORE_VENV [<repo>/.venv-cuda12], KSTORE_PYTHON [python3.11],
# KSTORE_SLURM_DIR [<repo>/runs/slurm] (the sbatch script and the job's log),
# KSTORE_SETUP_CMD (shell lines run in the job before srun, e.g. `module load cuda/12.4`).
#
# The repository, the venv and --workdir must be on a filesystem every node sees at the same
# path (all processes write their shards of each checkpoint into the same directory). Compute
# nodes without internet: create the venv on a login node first with the same KSTORE_VENV:
#   KSTORE_VENV=$PWD/.venv-cuda12 bash -c 'source launch/_venv.sh cuda12'   (same stamp file)
# Rerunning the same command resumes the run (finished stages are skipped).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES="${KSTORE_NODES:-2}"
GPUS="${KSTORE_GPUS_PER_NODE:-8}"
PARTITION="${KSTORE_PARTITION:-}"
TIME="${KSTORE_TIME:-04:00:00}"
ACCOUNT="${KSTORE_ACCOUNT:-}"
JOB="${KSTORE_JOB_NAME:-kstore}"
CPUS="${KSTORE_CPUS_PER_TASK:-8}"
VENV="${KSTORE_VENV:-$ROOT/.venv-cuda12}"
PY="${KSTORE_PYTHON:-python3.11}"
OUTDIR="${KSTORE_SLURM_DIR:-$ROOT/runs/slurm}"
own_flag() {
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    *) return 1 ;;
  esac
}
# shellcheck source=_args.sh source-path=SCRIPTDIR
source "$ROOT/launch/_args.sh"
parse_args "$@"
for v in NODES GPUS CPUS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v=${!v} must be a positive integer"
done
case "$WORKDIR" in /*) ;; *) WORKDIR="$PWD/$WORKDIR" ;; esac   # the job runs elsewhere
case "$CONFIG" in /*) ;; *) [ -f "${CONFIG%%:*}" ] && CONFIG="$PWD/$CONFIG" ;; esac

ARGS="--config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do ARGS+=" $(printf '%q' "$a")"; done
STAMP="$(date +%Y%m%d-%H%M%S)"
SCRIPT="$OUTDIR/$JOB-$STAMP.sbatch"

sbatch_script() {
  cat <<EOF
#!/bin/bash
#SBATCH --job-name=$JOB
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=$CPUS
#SBATCH --time=$TIME
#SBATCH --output=$OUTDIR/%x-%j.out
EOF
  if [ -n "$PARTITION" ]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [ -n "$ACCOUNT" ]; then echo "#SBATCH --account=$ACCOUNT"; fi
  cat <<EOF
# Written by launch/slurm_gpu.sh: $NODES node(s) x $GPUS GPU(s), one process per GPU.
${KSTORE_SETUP_CMD:-}
set -euo pipefail
cd $(printf '%q' "$ROOT")
# Install once ('.[cuda12]'); later jobs find the stamp and skip it.
export KSTORE_VENV=$(printf '%q' "$VENV")
if [ ! -f "\$KSTORE_VENV/.kstore_installed_cuda12" ] || [ setup.cfg -nt "\$KSTORE_VENV/.kstore_installed_cuda12" ]; then
  [ -x "\$KSTORE_VENV/bin/python" ] || $(printf '%q' "$PY") -m venv "\$KSTORE_VENV"
  "\$KSTORE_VENV/bin/python" -m pip install -q --upgrade pip
  "\$KSTORE_VENV/bin/python" -m pip install -q -e '.[cuda12]'
  touch "\$KSTORE_VENV/.kstore_installed_cuda12"
fi
# jax.distributed.initialize() reads srun's SLURM_* variables; drop a manual setup.
unset KSTORE_NUM_PROCESSES KSTORE_PROCESS_ID KSTORE_COORDINATOR JAX_COORDINATOR_ADDRESS
export XLA_PYTHON_CLIENT_MEM_FRACTION=\${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
echo "job \$SLURM_JOB_ID: \$SLURM_JOB_NUM_NODES node(s) \$SLURM_JOB_NODELIST, $((NODES * GPUS)) processes"
# srun takes no --cpus-per-task from sbatch since Slurm 22.05: each process would get one CPU
srun --kill-on-bad-exit=1 --label --cpus-per-task=$CPUS "\$KSTORE_VENV/bin/python" -m kstore_jax.main $ARGS
EOF
}

if [ "$DRY" = 1 ]; then
  echo "# sbatch script ($SCRIPT):"
  sbatch_script
  echo "+ mkdir -p $OUTDIR"
  echo "+ sbatch $SCRIPT"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found (run this on a SLURM login node; --dry-run shows the script)"
mkdir -p "$OUTDIR"
sbatch_script > "$SCRIPT"
echo "+ sbatch $SCRIPT"
sbatch "$SCRIPT"
echo "log: $OUTDIR/$JOB-<jobid>.out"
