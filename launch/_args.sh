# Argument parsing shared by the cluster launchers (sourced by tpu_pod.sh and slurm_gpu.sh).
# The launcher defines usage() (prints --help) and own_flag ARG (handles one of its own flags,
# returns 1 for one it doesn't know), then calls parse_args "$@": it sets DRY (--dry-run),
# CONFIG, WORKDIR (both required) and EXTRA (everything after --, for kstore_jax.main).
# shellcheck shell=bash disable=SC2034

PROG="$(basename "$0")"

die() { echo "$PROG: error: $*" >&2; exit 2; }

parse_args() {
  DRY=0 CONFIG="" WORKDIR=""
  EXTRA=()
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY=1 ;;
      --config=*) CONFIG="${1#--config=}" ;;
      --workdir=*) WORKDIR="${1#--workdir=}" ;;
      --) shift; EXTRA=("$@"); break ;;
      *) own_flag "$1" || die "unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  [ -n "$CONFIG" ] || die "--config=... is required"
  [ -n "$WORKDIR" ] || die "--workdir=... is required"
}
