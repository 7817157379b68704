# shellcheck shell=bash
# Sourced on the GPU device machine (no network): install the wheels that
# launch/device_wheels.sh downloaded into /tmp/kstore_site, then put the repo and that folder
# on PYTHONPATH.
#   source launch/_device_env.sh [DIR] || exit    (default .whl at the repo root; from a script
#                                                   with arguments of its own, pass "" for it)
# KSTORE_NO_WHEELS=1: the packages are installed already; only put the repo on PYTHONPATH.
_kstore_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${KSTORE_NO_WHEELS:-}" = 1 ]; then
  export PYTHONPATH="$_kstore_root${PYTHONPATH:+:$PYTHONPATH}"
else
  _kstore_whl="${1:-$_kstore_root/.whl}"
  if ! compgen -G "$_kstore_whl/*.whl" >/dev/null; then
    echo "_device_env.sh: no wheels in $_kstore_whl (run launch/device_wheels.sh where pip works, carry the folder; or set KSTORE_NO_WHEELS=1)" >&2
    return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kstore_site "$_kstore_whl"/*.whl || return 1
  export PYTHONPATH="$_kstore_root:/tmp/kstore_site${PYTHONPATH:+:$PYTHONPATH}"
fi
unset _kstore_root _kstore_whl
