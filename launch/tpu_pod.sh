#!/usr/bin/env bash
# Run an experiment on a Cloud TPU VM slice (single host or pod), from your workstation.
#   bash launch/tpu_pod.sh [--dry-run] [--delete] [--no-logs] \
#       --config=configs/<row>.py[:scale] --workdir=DIR [-- EXTRA kstore_jax.main ARGS...]
# Creates the TPU VM (or reuses it if it exists), puts the code on every worker (scp of this
# tree, or git clone), installs '.[tpu]' into a venv on every worker, starts
# `python -m kstore_jax.main` on all workers at once (--worker=all), then follows worker 0's
# log until the run ends. --delete deletes the TPU VM after the run; --no-logs returns after
# the start; --dry-run prints every command (one per line, prefixed '+ ') and runs none.
#
# Environment (defaults in brackets):
#   KSTORE_TPU_NAME [kstore-$USER]        KSTORE_ZONE (required, e.g. us-west4-a)
#   KSTORE_PROJECT [gcloud's default]     KSTORE_ACCELERATOR [v5litepod-16]
#   KSTORE_RUNTIME_VERSION [by accelerator: v2-alpha-tpuv5-lite, v2-alpha-tpuv6e,
#                           v2-alpha-tpuv5, else tpu-ubuntu2204-base]
#   KSTORE_REPO [copy]: 'copy' = scp this working tree; else a git URL to clone
#   KSTORE_BRANCH [main]   KSTORE_REMOTE_DIR [kstore_jax] (on the workers, relative to ~)
#   KSTORE_PYTHON [python3.11] (apt-installed on the workers if missing; jax needs >= 3.11)
#   KSTORE_SPOT [0]: 1 = create a Spot VM   KSTORE_SETUP_CMD: a shell command run on every
#   worker before the start, e.g. mounting the shared filesystem that holds the workdir.
#   KSTORE_POLL_S [10]: how often the log follower checks whether the run has ended.
#
# The workdir: every process of a multi-host slice writes its shards of each checkpoint into
# the SAME directory, so on a pod (more than one worker) --workdir must be a directory that
# all workers share at the same path: a Filestore (NFS) share or a Cloud Storage bucket
# mounted with gcsfuse (--implicit-dirs --rename-dir-limit=100000: orbax renames directories)
# via KSTORE_SETUP_CMD. gs:// URLs are not accepted (the workdir is used as a local path).
# On a single-host slice (e.g. v5litepod-8, v4-8) a path on the VM's disk is fine; a relative
# path is relative to KSTORE_REMOTE_DIR. Rerunning the same command resumes the run.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

DELETE=0 LOGS=1
own_flag() {
  case "$1" in
    --delete) DELETE=1 ;;
    --no-logs) LOGS=0 ;;
    *) return 1 ;;
  esac
}
# shellcheck source=_args.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_args.sh"
parse_args "$@"
[ -n "${KSTORE_ZONE:-}" ] || die "set KSTORE_ZONE (e.g. us-west4-a)"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The workers run from their copy of the repository: the config file is passed relative to it,
# and one outside it is refused here rather than after the VM, the copy and the install.
CFG_FILE="${CONFIG%%:*}" CFG_ARG="${CONFIG#"${CONFIG%%:*}"}"
[ -f "$CFG_FILE" ] || [ -f "$ROOT/$CFG_FILE" ] || die "--config=$CONFIG: no such file $CFG_FILE"
[ -f "$CFG_FILE" ] || CFG_FILE="$ROOT/$CFG_FILE"
CFG_ABS="$(cd "$(dirname "$CFG_FILE")" && pwd)/$(basename "$CFG_FILE")"
case "$CFG_ABS" in
  "$ROOT"/*) CONFIG="${CFG_ABS#"$ROOT"/}$CFG_ARG" ;;
  *) die "--config=$CONFIG: $CFG_ABS is outside the repository ($ROOT), which is what the workers get" ;;
esac
NAME="${KSTORE_TPU_NAME:-kstore-${USER:-user}}"
ACCEL="${KSTORE_ACCELERATOR:-v5litepod-16}"
case "$ACCEL" in
  v5litepod-*|v5e-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME="${KSTORE_RUNTIME_VERSION:-$DEFAULT_RUNTIME}"
REPO="${KSTORE_REPO:-copy}"
BRANCH="${KSTORE_BRANCH:-main}"
RDIR="${KSTORE_REMOTE_DIR:-kstore_jax}"
PY="${KSTORE_PYTHON:-python3.11}"
RUN_ID="$(date +%Y%m%d-%H%M%S)"
LOG="\$HOME/kstore_logs/$RUN_ID.log"   # expanded on the workers

GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$KSTORE_ZONE")
if [ -n "${KSTORE_PROJECT:-}" ]; then LOC+=(--project="$KSTORE_PROJECT"); fi

# Print a command as it would be typed (quoted where needed); run it unless --dry-run.
show() {
  local out="+" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"
    else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "$out"
}
run() { show "$@"; if [ "$DRY" = 0 ]; then "$@"; fi; }
on_all() { run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }
q() { printf '%q' "$1"; }   # quote one word for the workers' bash

# The working tree into a tarball: in a git checkout, what git sees (tracked files, deleted
# ones left out, and untracked ones it does not ignore: not .venv, runs/, the CUDA plugin of
# .aot/ (~450 MB), .whl/, caches); elsewhere the tree less the same few directories.
pack() {
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do if [ -e "$ROOT/$f" ]; then printf '%s\0' "$f"; fi; done \
      | tar -czf "$1" -C "$ROOT" --null -T -
  else
    tar -czf "$1" -C "$ROOT" --exclude=./.venv --exclude='./.venv-*' --exclude=./runs \
      --exclude=./.aot --exclude=./.whl --exclude=./.cache --exclude='*/__pycache__' \
      --exclude=./.pytest_cache .
  fi
}

# 1. The TPU VM: reuse it if it exists.
DESCRIBE=("${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')
show "${DESCRIBE[@]}"
if [ "$DRY" = 0 ] && STATE="$("${DESCRIBE[@]}" 2>/dev/null)"; then
  echo "# $NAME exists ($STATE): reusing it"
else
  if [ "$DRY" = 1 ]; then echo "# (--dry-run: assuming $NAME does not exist yet)"; fi
  CREATE=("${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME")
  if [ "${KSTORE_SPOT:-0}" = 1 ]; then CREATE+=(--spot); fi
  run "${CREATE[@]}"
fi

# 2. The code on every worker.
if [ "$REPO" = copy ]; then
  TARBALL="${TMPDIR:-/tmp}/kstore_jax-$RUN_ID.tgz"
  run pack "$TARBALL"
  run "${GC[@]}" scp "$TARBALL" "$NAME:kstore_jax_src.tgz" "${LOC[@]}" --worker=all
  on_all "mkdir -p $(q "$RDIR") && tar -xzf kstore_jax_src.tgz -C $(q "$RDIR") && rm kstore_jax_src.tgz"
  if [ "$DRY" = 0 ]; then rm -f "$TARBALL"; fi
else
  D="$(q "$RDIR")" B="$(q "$BRANCH")"
  on_all "if [ -d $D/.git ]; then git -C $D fetch -q origin $B && git -C $D checkout -q $B \
&& git -C $D reset -q --hard origin/$B; else git clone -q --branch $B $(q "$REPO") $D; fi"
fi

# 3. Python and the project ('.[tpu]') in a venv on every worker.
on_all "command -v $PY >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q \
$PY $PY-venv) && cd $(q "$RDIR") && ([ -x .venv/bin/python ] || $PY -m venv .venv) \
&& .venv/bin/python -m pip install -q --upgrade pip \
&& .venv/bin/python -m pip install -q -e '.[tpu]'"

if [ -n "${KSTORE_SETUP_CMD:-}" ]; then on_all "$KSTORE_SETUP_CMD"; fi

# 4. Start the run on all workers at once, detached from the ssh session (HUP ignored, all
#    output to ~/kstore_logs/<time>.log, exit status to <log>.rc). JAX_COORDINATOR_ADDRESS
#    (worker 0) makes kstore_jax.main call jax.distributed.initialize(); JAX reads the process
#    count and ids from the TPU metadata.
ADDR=("${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(networkEndpoints[0].ipAddress)')
show "${ADDR[@]}"
if [ "$DRY" = 0 ]; then IP="$("${ADDR[@]}")"; else IP="WORKER0_IP"; fi
ARGS="--config=$(q "$CONFIG") --workdir=$(q "$WORKDIR")"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do ARGS+=" $(q "$a")"; done
on_all "if pgrep -f '^[^ ]*python[^ ]* -m kstore_jax[.]main' >/dev/null; then echo \"a kstore_jax run is already \
running on \$(hostname)\" >&2; exit 1; fi; mkdir -p ~/kstore_logs && cd $(q "$RDIR") \
&& { (trap '' HUP; JAX_COORDINATOR_ADDRESS=$IP:8476 .venv/bin/python -m kstore_jax.main $ARGS; \
echo \$? > $LOG.rc) > $LOG 2>&1 < /dev/null & } && echo \"started on \$(hostname): $LOG\""

# 5. Follow worker 0's log until the run ends (Ctrl-C stops following, not the run), then
#    --delete deletes the TPU VM (whatever the run's exit status; the workdir stays).
if [ "$LOGS" = 0 ]; then
  if [ "$DELETE" = 1 ]; then
    echo "tpu_pod.sh: --delete waits for the run to end: not deleting $NAME with --no-logs" >&2
  fi
  exit 0
fi
RC=0
POLL="${KSTORE_POLL_S:-10}"
FOLLOW="tail -n +1 -F $LOG 2>/dev/null & T=\$!; while [ ! -f $LOG.rc ]; do sleep $POLL; done; \
sleep 2; kill \$T; exit \$(cat $LOG.rc)"
run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="$FOLLOW" || RC=$?
if [ "$DELETE" = 1 ]; then run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet; fi
if [ "$RC" != 0 ]; then echo "tpu_pod.sh: the run exited with status $RC" >&2; fi
exit "$RC"
