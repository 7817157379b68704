"""Device mesh (data, fsdp, tensor) with Auto axes, logical axis rules, state/batch shardings."""

import functools
import math

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
  """Shardings for a tree of (abstract) arrays boxed with logical partitioning metadata. A dim
  the rules put on mesh axes it is no multiple of stays whole along them (the model's vocab,
  a multiple of 128, over `tensor` = 3 or 6: init refused to split 896 rows three ways)."""
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  values = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed_tree, is_leaf=is_box)
  return jax.tree.map(lambda sh, x: _divisible(sh, x.shape), shardings, values)


def _divisible(sh: NamedSharding, shape) -> NamedSharding:
  """`sh` with each dim's mesh axes dropped where the dim is no multiple of their size."""
  entries = list(sh.spec) + [None] * (len(shape) - len(sh.spec))
  kept = [e if n % math.prod(sh.mesh.shape[a] for a in _axis_names(e)) == 0 else None
          for e, n in zip(entries, shape)]
  return sh if kept == entries else NamedSharding(sh.mesh, P(*kept))


def _axis_names(entry) -> tuple[str, ...]:
  """The mesh axes a PartitionSpec entry (None, a mesh axis or a tuple of them) names."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


@functools.lru_cache(maxsize=64)
def process_rows(sh: NamedSharding, global_batch: int) -> tuple[tuple[int, ...], ...]:
  """The rows of a global batch that each process's devices hold, sorted, from the sharding's
  device indices. Distinct while the batch axes span the processes, equal where processes
  share rows (e.g. `tensor` across hosts: data * fsdp < process count); not one block each
  where the mesh orders devices otherwise than by process (a TPU pod's 1-D data or fsdp axis
  follows the torus ring, so a host's rows interleave with its neighbours')."""
  rows = [set() for _ in range(jax.process_count())]
  for device, index in sh.devices_indices_map((global_batch,)).items():
    rows[device.process_index].update(range(global_batch)[index[0]])
  return tuple(tuple(sorted(r)) for r in rows)


def _held_rows(batch: dict, sh: NamedSharding) -> tuple[dict, int]:
  """(the rows of the global batch this process's devices hold, in order, and the global row
  count), from this process's block of it (the pipeline's `ProcessSlice`: block
  `process_index` of `process_count` equal blocks). Where each process's devices hold its own
  block that is the block itself; otherwise (processes sharing rows, or holding rows apart)
  every process first gathers the others' blocks (a collective, decided from the mesh alone,
  so all processes take it) and keeps its rows (`make_array_from_process_local_data` maps
  them to its devices in order)."""
  local = {k: np.asarray(v) for k, v in batch.items()}
  count = jax.process_count()
  n = len(next(iter(local.values())))
  rows = process_rows(sh, n * count)
  if rows != tuple(tuple(range(i * n, (i + 1) * n)) for i in range(count)):
    mine = np.asarray(rows[jax.process_index()])
    local = {k: v[mine] for k, v in
             multihost_utils.process_allgather(local, tiled=True).items()}
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
  kept = tuple(a for a in _axis_names(entry) if a != axis)
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
