#!/usr/bin/env bash
# Compile for a GPU on this machine without one: install jax's CUDA plugin (the pip package
# jax-cuda13-plugin of the environment's jaxlib version, ~130 MB, without its CUDA libraries,
# which compiling does not need) into .aot/ once, then run `python -m kstore_jax.bench ARGS`
# with it on the path (train/aot.py, BENCHMARKS.md "The step's floor, compiled here"), e.g.
#   bash launch/aot_plugin.sh roofline --config=configs/base.py:small --cohort_runs=10
#   bash launch/aot_plugin.sh --ptxas roofline --config=configs/base.py
#   bash launch/aot_plugin.sh --tpu roofline --config=configs/base.py:small --target=v5e:2x2
# --tpu also installs libtpu (jax's `tpu` extra's pin, ~210 MB): compile-only TPU slices.
# --ptxas also installs nvidia-cuda-nvcc's ptxas (50 MB): `bench roofline` then
# reads each Pallas kernel's build (registers, spills, Hopper wgmma) from XLA's PTX.
# The plugin stays out of .venv: there jax would find it in every process and look for a GPU.
set -euo pipefail
# shellcheck source=_venv.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" ""   # no extras (not this script's arguments)
AOT="$ROOT/.aot"
JAXLIB="$(python -c 'import jaxlib; print(jaxlib.__version__)')"
if [ ! -f "$AOT/.installed_$JAXLIB" ]; then
  rm -rf "$AOT"
  python -m pip install -q --no-deps --target "$AOT" "jax-cuda13-plugin==$JAXLIB" \
    "jax-cuda13-pjrt==$JAXLIB"
  touch "$AOT/.installed_$JAXLIB"
fi
if [ "${1:-}" = "--tpu" ]; then   # libtpu of jax's `tpu` extra: compile-only TPU slices
  shift
  LIBTPU="$(python - <<'PY'
import importlib.metadata as m, re
print(next(re.sub(r";.*", "", r).replace(" ", "") for r in m.requires("jax") or []
           if r.startswith("libtpu") and "tpu" in r))
PY
)"
  if [ ! -f "$AOT/.installed_$LIBTPU" ]; then
    python -m pip install -q --no-deps --target "$AOT" "$LIBTPU"
    touch "$AOT/.installed_$LIBTPU"
  fi
fi
if [ "${1:-}" = "--ptxas" ]; then
  shift
  if [ ! -x "$AOT/nvidia/cu13/bin/ptxas" ]; then
    python -m pip install -q --no-deps --target "$AOT/.nvcc" "nvidia-cuda-nvcc>=13.0,<14"
    mkdir -p "$AOT/nvidia/cu13/bin" && cp "$AOT/.nvcc/nvidia/cu13/bin/ptxas" "$AOT/nvidia/cu13/bin/"
    rm -rf "$AOT/.nvcc"
  fi
fi
# JAX_PLATFORMS=cpu: the plugin is found (its compile-only devices) but no GPU is looked for
PYTHONPATH="$AOT${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu exec python -m kstore_jax.bench "$@"
