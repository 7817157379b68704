"""Device mesh (data, fsdp, tensor) with Auto axes, logical axis rules, state/batch shardings."""

import functools

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
         ("heads", "tensor"), ("vocab", "tensor"), ("kv", None))


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
  """Resolve -1 (the rest) and check the product against the device count."""
  sizes = [int(mesh_cfg[a]) for a in AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes {dict(zip(AXES, sizes))} must be positive, at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if n_devices % known:
      raise ValueError(f"mesh: {dict(zip(AXES, sizes))} does not divide {n_devices} devices")
    sizes[free[0]] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are "
                     f"{n_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg) -> jax.sharding.Mesh:
  shape = mesh_shape(mesh_cfg, jax.device_count())
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh) -> NamedSharding:
  """Every field of a batch (data/batches.py: the leading axis is the row) split by rows."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def batch_shards(mesh) -> int:
  """How many blocks `batch_sharding` splits a batch's rows into (mesh.data * mesh.fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh):
  """Shardings for a tree of (abstract) arrays boxed with logical partitioning metadata."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


@functools.lru_cache(maxsize=64)
def process_rows(sh: NamedSharding, global_batch: int) -> tuple[tuple[int, int], ...]:
  """[start, stop) of the rows of a global batch that each process's devices hold, from the
  sharding's device indices (one contiguous block per process: processes are the mesh's
  outermost devices). Blocks are distinct while the batch axes span the processes and equal
  where processes share rows (e.g. `tensor` across hosts: data * fsdp < process count)."""
  rows = [set() for _ in range(jax.process_count())]
  for device, index in sh.devices_indices_map((global_batch,)).items():
    rows[device.process_index].update(range(global_batch)[index[0]])
  blocks = tuple((min(r), max(r) + 1) for r in rows)
  if any(len(r) != hi - lo for r, (lo, hi) in zip(rows, blocks)):
    raise ValueError(f"a process's devices hold non-contiguous batch rows: {blocks}")
  return blocks


def _held_rows(batch: dict, sh: NamedSharding) -> tuple[dict, int]:
  """(the rows of the global batch this process's devices hold, the global row count), from
  this process's block of it (the pipeline's `ProcessSlice`: block `process_index` of
  `process_count` equal blocks). While the batch axes span the processes that is the block
  itself; where processes share rows, every process first gathers the others' blocks (a
  collective, decided from the mesh alone, so all processes take it) and keeps its rows."""
  local = {k: np.asarray(v) for k, v in batch.items()}
  count = jax.process_count()
  n = len(next(iter(local.values())))
  blocks = process_rows(sh, n * count)
  if blocks != tuple((i * n, (i + 1) * n) for i in range(count)):
    lo, hi = blocks[jax.process_index()]
    local = {k: v[lo:hi] for k, v in multihost_utils.process_allgather(local, tiled=True).items()}
  return local, n * count


def to_global(batch: dict, mesh) -> dict:
  """This process's block of a global batch (any layout of data/batches.py) -> global
  jax.Arrays sharded over (data, fsdp), each device given exactly the rows it holds."""
  sh = batch_sharding(mesh)
  local, n = _held_rows(batch, sh)
  return {k: jax.make_array_from_process_local_data(sh, v, (n, *v.shape[1:]))
          for k, v in local.items()}


def run_axis_for(choice: str, mesh, n_runs: int) -> str | None:
  """The mesh axis a grid cohort of `n_runs` runs is split over, None for the run axis
  replicated (grid.run_axis: configs/grids RUN_AXES). 'data': each run's whole batch on its own
  slice of the `data` axis, so a run's gradients need no all-reduce across it, where the axis is
  larger than 1 and divides the runs (else replicated); 'replicated': every device holds every
  run, each run's rows split over data x fsdp as when it trains alone."""
  size = mesh.shape["data"]
  return "data" if choice == "data" and size > 1 and n_runs % size == 0 else None


def _without(entry, axis: str):
  """A PartitionSpec entry (None, a mesh axis or a tuple of them) without mesh axis `axis`."""
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  kept = tuple(a for a in names if a != axis)
  return kept[0] if len(kept) == 1 else (kept or None)


def with_run_axis(sh: NamedSharding, run_axis: str | None = None) -> NamedSharding:
  """`sh` for the same array with a leading run axis (grid mode): replicated (None), or split
  over mesh axis `run_axis`, which the other dimensions then no longer use."""
  if run_axis is None:
    return NamedSharding(sh.mesh, P(None, *sh.spec))
  return NamedSharding(sh.mesh, P(run_axis, *(_without(e, run_axis) for e in sh.spec)))


def to_global_stacked(rows: list[dict], mesh, run_axis: str | None = None) -> dict:
  """Several runs' per-process batches (each as `to_global` takes it) -> global jax.Arrays
  [R, B, ...], sharded by `with_run_axis(batch_sharding, run_axis)`. Run axis replicated: the
  rows sharded (and shared between processes) as in one run's batch; the runs are stacked
  behind the rows first, so processes that share rows gather every run's block in one
  collective. Run axis split: a process's devices hold whole runs, whose other rows the other
  processes read (each process's pipelines read its block of every run): with several
  processes every step gathers the blocks (a collective decided by the mesh alone)."""
  sh = batch_sharding(mesh)
  stacked = {k: np.stack([np.asarray(r[k]) for r in rows], axis=1) for k in rows[0]}  # [rows, R]
  if run_axis is None:
    local, n = _held_rows(stacked, sh)
    return {k: jax.make_array_from_process_local_data(
        with_run_axis(sh), np.moveaxis(v, 1, 0), (len(rows), n, *v.shape[2:]))
            for k, v in local.items()}
  if jax.process_count() > 1:
    stacked = multihost_utils.process_allgather(stacked, tiled=True)
  run_sh = with_run_axis(sh, run_axis)
  out = {}
  for k, v in stacked.items():
    full = np.moveaxis(v, 1, 0)                                        # [R, B, ...] global
    out[k] = jax.make_array_from_callback(full.shape, run_sh, lambda idx, a=full: a[idx])
  return out
