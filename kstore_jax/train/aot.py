"""Compiling for a GPU on a host without one (ahead of time, deviceless): compile-only devices
from jax's CUDA plugin for a described target, so that a CPU machine compiles the very program
XLA would build for that GPU (its fusions, kernels and Triton/Pallas code) and `bench
roofline` can read it (train/roofline.py).

The plugin is the pip package jax-cuda13-plugin of the installed jaxlib's version, its
`with-cuda` libraries not needed (`bash launch/aot_plugin.sh` installs it beside the
project's environment, into `.aot/`, and runs the bench with it). Without a device nothing
autotunes: XLA picks its GEMM tilings by heuristics (the program's fusions and kernels are
the device's; the GEMM configurations are not), and no one runs it here."""

import glob
import math
import os
import re
import shutil
import subprocess

import jax
import numpy as np

# XLA's GpuTargetConfig (text proto) of the GPUs a step is compiled for: the device facts XLA
# reads when it fuses and emits kernels (from the vendor's datasheet and jax's own device
# description of an H200 SXM: 132 SMs, 1,980 MHz, 141 GB at 4.8 TB/s, 50 MiB of L2; the H100
# SXM the device tool also lends: the same chip with 80 GB at 3.35 TB/s), and the CUDA / cuDNN
# versions of the lent machine's image (CUDA 13.0, cuDNN 9.12)
TARGETS = {
    "h200": dict(name="NVIDIA H200", core_count=132, clock_rate_ghz=1.98,
                 memory_bandwidth=4_800_000_000_000, l2_cache_size=52_428_800,
                 device_memory_size=150_754_820_096, capability=(9, 0)),
    "h100": dict(name="NVIDIA H100 80GB HBM3", core_count=132, clock_rate_ghz=1.98,
                 memory_bandwidth=3_350_000_000_000, l2_cache_size=52_428_800,
                 device_memory_size=85_520_809_984, capability=(9, 0)),
}
# The ceilings a target's floor is counted at: the best rates measured on the lent machines
# (/work/.library/device KINDS.md, through PyTorch: on the H200 a bf16 8192^3 matmul at 769-798
# TFLOP/s on random data and a device-to-device copy at 4.3 TB/s; this project's own `bench
# ceiling` through jax reached 653-737 and 3.62: BENCHMARKS.md; on the H100 798 TFLOP/s and 3.0
# TB/s), so the floor is one no kernel beats
CEILINGS = {"h200": dict(flops_per_s=790e12, bytes_per_s=4.3e12),
            "h100": dict(flops_per_s=798e12, bytes_per_s=3.0e12)}
# TPU slices, named by libtpu's topology (chips per axis), with the device kind jax reports
# and one chip's ceilings from Google's datasheets (bf16 peak, HBM bandwidth: none measured
# here), compiled by libtpu (the `tpu` extra's pin: launch/aot_plugin.sh --tpu)
TPU_TARGETS = {
    "v4:2x2x1": dict(name="TPU v4", flops_per_s=275e12, bytes_per_s=1.228e12),
    "v5e:2x2": dict(name="TPU v5 lite", flops_per_s=197e12, bytes_per_s=0.819e12),
    "v5p:2x2x1": dict(name="TPU v5", flops_per_s=459e12, bytes_per_s=2.765e12),
    "v6e:2x2": dict(name="TPU v6 lite", flops_per_s=918e12, bytes_per_s=1.64e12),
}
CEILINGS.update({t: dict(flops_per_s=v["flops_per_s"], bytes_per_s=v["bytes_per_s"])
                 for t, v in TPU_TARGETS.items()})


def platform(target: str) -> str:
  """What a target compiles for: cuda or tpu."""
  return "tpu" if target in TPU_TARGETS else "cuda"


def name(target: str) -> str:
  """The device kind of a target's devices (as jax reports it: the MFU's peak)."""
  return (TPU_TARGETS if target in TPU_TARGETS else TARGETS)[target]["name"]


_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {core_count}
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {memory_bandwidth} l2_cache_size: {l2_cache_size}
  clock_rate_ghz: {clock_rate_ghz} device_memory_size: {device_memory_size}
  shared_memory_per_block_optin: 232448 registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""


def target_of(device_kind: str) -> str | None:
  """The TARGETS key of a GPU's device kind (`NVIDIA H200`), or None."""
  return next((t for t, v in TARGETS.items() if v["name"] == device_kind), None)


class PluginMissing(RuntimeError):
  """jax's CUDA plugin is not importable: nothing can compile for a GPU here."""


def target_config(target: str) -> str:
  """The GpuTargetConfig text of TARGETS[target]."""
  t = dict(TARGETS[target])
  major, minor = t.pop("capability")
  return _CONFIG.format(major=major, minor=minor, **t)


def devices(target: str, n: int = 1) -> list:
  """`n` compile-only devices of the GPU `target` (TARGETS) on one host, from jax's CUDA
  plugin; of a TPU target (TPU_TARGETS), its slice's (n is the slice's), from libtpu."""
  from jax.experimental import topologies
  if target in TPU_TARGETS:
    try:
      return list(topologies.get_topology_desc(topology_name=target, platform="tpu").devices)
    except RuntimeError as e:   # "JAX TPU support not installed"
      raise PluginMissing(f"compiling for a {target} TPU slice here needs libtpu: bash "
                          f"launch/aot_plugin.sh --tpu installs it ({e})") from None
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target),
                                        topology=f"1x1x{n}")
  except NotImplementedError:   # jax found no CUDA plugin to make the topology with
    raise PluginMissing(f"compiling for an {TARGETS[target]['name']} here needs jax's CUDA plugin "
                        f"(jax-cuda13-plugin=={jax.__version__}): bash launch/aot_plugin.sh "
                        "installs it and runs the bench with it") from None
  return list(topo.devices)


def mesh(target: str, axes: tuple[str, ...], shape: tuple[int, ...] | None = None
         ) -> jax.sharding.Mesh:
  """A mesh of compile-only `target` devices with `axes` of sizes `shape` (default: all 1)."""
  shape = shape or (1,) * len(axes)
  found = devices(target, math.prod(shape))
  if len(found) != math.prod(shape):
    raise ValueError(f"a mesh of {dict(zip(axes, shape))} needs {math.prod(shape)} devices; "
                     f"{target} has {len(found)}")
  return jax.sharding.Mesh(np.array(found).reshape(shape), axes,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def device_count(target: str, n: int) -> int:
  """The devices a mesh of `target` spans: n GPUs, or a TPU slice's own count."""
  return len(devices(target)) if target in TPU_TARGETS else n


# -- reading a kernel's build: ptxas's resource report of the PTX XLA emitted -----------------
def ptxas() -> str | None:
  """ptxas, from the nvidia-cuda-nvcc package beside the plugin (launch/aot_plugin.sh
  --ptxas) or the PATH; None without it."""
  try:
    import nvidia   # a namespace package: nvidia/cu13/bin/ptxas where nvidia-cuda-nvcc is
    found = [os.path.join(p, "cu13", "bin", "ptxas") for p in nvidia.__path__]
  except ImportError:
    found = []
  return next((p for p in found if os.access(p, os.X_OK)), None) or shutil.which("ptxas")


def parse_ptxas(report: str) -> dict[str, dict]:
  """{function: {registers, stack_bytes, spill_store_bytes, spill_load_bytes,
  wgmma_serialized}} from `ptxas -v`'s report; `wgmma_serialized`: ptxas's C7515 (Hopper's
  asynchronous matrix instructions of that function run one after another)."""
  out: dict[str, dict] = {}
  current = None
  for line in report.splitlines():
    if m := re.search(r"(?:Compiling entry function|Function properties for) '?([\w.$]+)'?",
                      line):
      current = out.setdefault(m.group(1), {"wgmma_serialized": False})
    elif current is not None and (m := re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
      current.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                     spill_load_bytes=int(m.group(3)))
    elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
      current["registers"] = int(m.group(1))
    if "C7515" in line and (m := re.search(r"in the function '([\w.$]+)'", line)):
      out.setdefault(m.group(1), {})["wgmma_serialized"] = True
  return out


def kernel_builds(dump_dir: str, names: tuple[str, ...], arch: str = "sm_90a") -> dict:
  """{kernel: ptxas's report (parse_ptxas) + `wgmma` (Hopper matrix instructions in its
  PTX)} of the kernels called `names` in an XLA dump (`xla_dump_to`) of a module compiled
  for a TARGETS GPU."""
  tool = ptxas()
  if tool is None:
    raise PluginMissing("reading kernel builds needs ptxas: bash launch/aot_plugin.sh "
                        "--ptxas installs nvidia-cuda-nvcc beside the plugin")
  out = {}
  for path in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
    with open(path) as f:
      ptx = f.read()
    starts = {n: m.end() for n in names if (m := re.search(rf"\.entry {re.escape(n)}\(", ptx))}
    if not starts:
      continue
    report = subprocess.run([tool, f"-arch={arch}", "-v", path, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    facts = parse_ptxas(report)
    for n, start in starts.items():   # the entry's own body: to the next entry or the end
      body = ptx[start:]
      body = body[:m.start()] if (m := re.search(r"\.entry ", body)) else body
      out[n] = dict(facts.get(n, {}), wgmma=body.count("wgmma.mma_async"))
  return out
