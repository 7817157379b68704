#!/usr/bin/env bash
# Download, here (pip and the PyPI registry), the wheels that the GPU device machine lacks
# (CPython 3.12, x86-64 manylinux, no network there): the project's packages missing from its
# image and every dependency of theirs it lacks, one version each. Then check that the wheels'
# Requires-Dist are all met by (these wheels + the image's packages) and list them.
#   bash launch/device_wheels.sh [DIR]      (default .whl at the repo root; ignored by git)
# Rerunning downloads nothing that DIR already holds in range (delete DIR to refresh).
# On the device: source launch/_device_env.sh [DIR]   (installs them, sets PYTHONPATH).
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"

# What the device lacks: setup.cfg's ranges (upper bounds added here), then what these need.
# Not carried: tensorflow-datasets (setup.cfg's, with its many dependencies): nothing the
# device check runs reads tfds; exporting or reading `data.source=tfds:DIR` there would need it.
REQS=(
  'grain>=0.2.18,<0.3'
  'array-record>=0.8.1,<0.9'   # setup.cfg: >=0.8; grain 0.2.18 needs >=0.8.1
  'ml-collections>=1.1,<2'
  'tensorboardX>=2.6,<3'
  'portpicker>=1.5,<2'         # grain's dependency
  # model.attention=tokamax (optional; setup.cfg's extra) and what it needs beyond the image
  'tokamax>=0.0.12,<0.1'
  'pydantic==2.14.4'           # pinned with its core: pydantic names one exact pydantic-core
  'pydantic-core==2.50.5'
  'annotated-types>=0.6'
  'typing-inspection>=0.4'
  'typeguard==2.13.3'          # tokamax pins it
  'qwix>=0.1.2,<0.2'
  'einshape>=1.0'
  'immutabledict>=4'
  'xprof>=2.23.1'              # tokamax >= 0.0.13 imports xprof.cli.tools, which needs:
  'fire>=0.4'
  'termcolor>=2'
)
# Requirements of the wheels above that are not carried: xprof's profile server and cloud
# storage, which `import tokamax` (xprof.cli.tools) does not reach (checked: it imports with
# only fire and termcolor beside xprof).
UNNEEDED="gviz-api cheroot google-cloud-storage duckdb"
# The device image's Python packages (.library/device/KINDS.md, read 2026-11-17): never carried.
PREINSTALLED="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"
PIP=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform manylinux1_x86_64)

norm() { echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'; }
mkdir -p "$DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
for req in "${REQS[@]}"; do
  name="$(norm "${req%%[<>=!~;[ ]*}")"
  rm -rf "${TMP:?}"/*
  # a wheel in DIR that fits: copied from there, no network; else from the registry
  if ! "${PIP[@]}" --no-index --find-links "$DIR" -d "$TMP" "$req" >/dev/null 2>&1; then
    echo "downloading $req"
    "${PIP[@]}" -d "$TMP" "$req"
  fi
  new="$(basename "$(ls "$TMP"/*.whl)")"
  for f in "$DIR"/*.whl; do   # keep one version: drop this package's other wheels
    b="$(basename "$f")"
    if [ -e "$f" ] && [ "$(norm "${b%%-*}")" = "$name" ] && [ "$b" != "$new" ]; then
      echo "removing $b (now $new)"
      rm -f "$f"
    fi
  done
  [ -e "$DIR/$new" ] || mv "$TMP/$new" "$DIR/"
done

# Check and list: each wheel's Requires-Dist (for CPython 3.12 on Linux, no extras) must name
# a wheel here, a package of the image or one of UNNEEDED; a wheel of no package in REQS is
# reported.
"$PY" - "$DIR" "$PREINSTALLED $UNNEEDED" "${REQS[@]}" <<'EOF'
import glob, os, re, sys, zipfile
try:
  from packaging.requirements import Requirement
except ImportError:
  from pip._vendor.packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wdir, device, reqs = sys.argv[1], set(map(norm, sys.argv[2].split())), sys.argv[3:]
env = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
           platform_system="Linux", platform_machine="x86_64", os_name="posix",
           implementation_name="cpython", platform_python_implementation="CPython", extra="")
wheels = sorted(glob.glob(os.path.join(wdir, "*.whl")))
have = {norm(os.path.basename(w).split("-")[0]): w for w in wheels}
wanted = {norm(Requirement(r).name) for r in reqs}
bad = [f"{os.path.basename(w)}: no package of the list" for n, w in have.items() if n not in wanted]
bad += [f"{n}: also on the device" for n in have if n in device]
for w in wheels:
  with zipfile.ZipFile(w) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
  for line in meta.splitlines():
    if line.startswith("Requires-Dist:"):
      r = Requirement(line.split(":", 1)[1].strip())
      if (not r.marker or r.marker.evaluate(env)) and norm(r.name) not in device | have.keys():
        bad.append(f"{os.path.basename(w)} needs {r}: neither here nor on the device")
total = 0
for w in wheels:
  total += os.path.getsize(w)
  print(f"{os.path.getsize(w) / 1e3:9.1f} kB  {os.path.basename(w)}")
print(f"{total / 1e6:9.2f} MB  in {len(wheels)} wheels, {wdir}")
for b in bad:
  print("PROBLEM:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
