"""Device memory: what a compiled step needs a device and what a device holds, so a step
that cannot fit is refused in one line before it runs (`loop.run_cohort`) and a grid's
cohorts are cut to what fits (`loop.fit_runs`, tools/grid.py).

A step's need is XLA's own count of its compiled buffers a device (arguments, outputs not
aliased to them, temporaries: `compiled.memory_analysis()`), which is what its allocation
takes: on a 2-core CPU host the 10-run `small` cohort's step counts 66.26 GB of temporaries
and XLA:CPU failed allocating exactly those 66,264,760,704 bytes (BENCHMARKS.md, "Grid
cohorts that fit").
"""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

FIT_SHARE = 0.9   # a grid cohort's step may take this share of a device's memory (fragments,
                  # the next batch, a checkpoint's copy); a single step is refused only
                  # above the whole of it


def step_bytes(compiled) -> int:
  """The bytes a device holds while `compiled` (a jax Compiled) runs: its arguments, its
  outputs that do not reuse an argument's buffer (donation) and its temporaries."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def device_bytes(device) -> int | None:
  """What one device can hold: a GPU's or TPU's allocator limit (jax takes 75% of a GPU's
  memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise), a CPU device's share of this
  machine's RAM (the process's CPU devices share it); None where the platform does not say."""
  if device.platform == "cpu":
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // len(jax.local_devices(backend="cpu"))
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def budget_bytes(memory_gb: float, mesh) -> int | None:
  """What a step may use a device: `memory_gb` (train.memory_gb) when set, else the least
  that one of the mesh's devices holds (device_bytes; several processes agree on the least
  of theirs, so each refuses or cuts a cohort alike); None if unknown."""
  if memory_gb:
    return int(memory_gb * 1e9)
  held = [device_bytes(d) for d in mesh.devices.flat if d.process_index == jax.process_index()]
  least = -1 if not held or None in held else min(held)   # -1: unknown here
  if jax.process_count() > 1:
    every = multihost_utils.process_allgather(np.int64(least))
    least = -1 if (every < 0).any() else int(every.min())
  return None if least < 0 else least


def gb(n: int) -> str:
  """Bytes as GB in a message: three significant digits, down to toy steps' megabytes."""
  return f"{n / 1e9:.3g} GB"
