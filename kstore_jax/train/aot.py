"""Compiling for a GPU on a host without one (ahead of time, deviceless): compile-only devices
from jax's CUDA plugin for a described target, so that a CPU machine compiles the very program
XLA would build for that GPU (its fusions, kernels and Triton/Pallas code) and `bench
roofline` can read it (train/roofline.py).

The plugin is the pip package jax-cuda13-plugin of the installed jaxlib's version, its
`with-cuda` libraries not needed (`bash launch/aot_plugin.sh` installs it beside the
project's environment, into `.aot/`, and runs the bench with it). Without a device nothing
autotunes: XLA picks its GEMM tilings by heuristics (the program's fusions and kernels are
the device's; the GEMM configurations are not), and no one runs it here."""

import jax
import numpy as np

# XLA's GpuTargetConfig (text proto) of the GPUs a step is compiled for: the device facts XLA
# reads when it fuses and emits kernels (from the vendor's datasheet and jax's own device
# description of an H200 SXM: 132 SMs, 1,980 MHz, 141 GB at 4.8 TB/s, 50 MiB of L2), and the
# CUDA / cuDNN versions of the lent machine's image (CUDA 13.0, cuDNN 9.12)
TARGETS = {
    "h200": dict(name="NVIDIA H200", core_count=132, clock_rate_ghz=1.98,
                 memory_bandwidth=4_800_000_000_000, l2_cache_size=52_428_800,
                 device_memory_size=150_754_820_096, capability=(9, 0)),
}
# The ceilings a target's floor is counted at: the best rates measured on the lent H200
# (/work/.library/device KINDS.md: a bf16 8192^3 matmul at 769-798 TFLOP/s on random data and a
# device-to-device copy at 4.3 TB/s, through PyTorch; this project's own `bench ceiling`
# through jax reached 653-737 and 3.62: BENCHMARKS.md), so the floor is one no kernel beats
CEILINGS = {"h200": dict(flops_per_s=790e12, bytes_per_s=4.3e12)}
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
  """The TARGETS key of a device kind (`NVIDIA H200`), or None."""
  return next((t for t, v in TARGETS.items() if v["name"] == device_kind), None)


class PluginMissing(RuntimeError):
  """jax's CUDA plugin is not importable: nothing can compile for a GPU here."""


def target_config(target: str) -> str:
  """The GpuTargetConfig text of TARGETS[target]."""
  t = dict(TARGETS[target])
  major, minor = t.pop("capability")
  return _CONFIG.format(major=major, minor=minor, **t)


def device(target: str):
  """A compile-only device of the GPU `target` (TARGETS), from jax's CUDA plugin."""
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target),
                                        topology="1x1x1")
  except NotImplementedError:   # jax found no CUDA plugin to make the topology with
    raise PluginMissing(f"compiling for an {TARGETS[target]['name']} here needs jax's CUDA plugin "
                        f"(jax-cuda13-plugin=={jax.__version__}): bash launch/aot_plugin.sh "
                        "installs it and runs the bench with it") from None
  return topo.devices[0]


def mesh(target: str, axes: tuple[str, ...]) -> jax.sharding.Mesh:
  """A one-device mesh of a compile-only `target` GPU with `axes` (each of size 1)."""
  return jax.sharding.Mesh(np.array([device(target)]).reshape((1,) * len(axes)), axes,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
