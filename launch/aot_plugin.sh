#!/usr/bin/env bash
# Compile for a GPU on this machine without one: install jax's CUDA plugin (the pip package
# jax-cuda13-plugin of the environment's jaxlib version, ~130 MB, without its CUDA libraries,
# which compiling does not need) into .aot/ once, then run `python -m kstore_jax.bench ARGS`
# with it on the path (train/aot.py, BENCHMARKS.md "The step's floor, compiled here"), e.g.
#   bash launch/aot_plugin.sh roofline --config=configs/base.py:small --cohort_runs=10
# The plugin stays out of .venv: there jax would find it in every process and look for a GPU.
set -euo pipefail
# shellcheck source=_venv.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
AOT="$ROOT/.aot"
JAXLIB="$(python -c 'import jaxlib; print(jaxlib.__version__)')"
if [ ! -f "$AOT/.installed_$JAXLIB" ]; then
  rm -rf "$AOT"
  python -m pip install -q --no-deps --target "$AOT" "jax-cuda13-plugin==$JAXLIB" \
    "jax-cuda13-pjrt==$JAXLIB"
  touch "$AOT/.installed_$JAXLIB"
fi
# JAX_PLATFORMS=cpu: the plugin is found (its compile-only devices) but no GPU is looked for
PYTHONPATH="$AOT${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu exec python -m kstore_jax.bench "$@"
