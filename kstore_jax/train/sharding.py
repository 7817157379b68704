"""Device mesh (data, fsdp, tensor) with Auto axes, logical axis rules, state/batch shardings."""

import flax.linen as nn
import jax
import numpy as np
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
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh):
  """Shardings for a tree of (abstract) arrays boxed with logical partitioning metadata."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def to_global(batch: dict, mesh) -> dict:
  """Per-process NumPy rows -> global jax.Arrays sharded over (data, fsdp)."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def with_run_axis(sh: NamedSharding) -> NamedSharding:
  """`sh` for the same array with a leading run axis (grid mode), the run axis replicated."""
  return NamedSharding(sh.mesh, P(None, *sh.spec))


def to_global_stacked(rows: list[dict], mesh) -> dict:
  """Several runs' per-process batches (each as `to_global` takes it) -> global jax.Arrays
  [R, B, ...]: the run axis replicated, rows sharded as in one run's batch."""
  sh = with_run_axis(batch_sharding(mesh))
  return {k: jax.make_array_from_process_local_data(sh, np.stack([np.asarray(r[k])
                                                                 for r in rows]))
          for k in rows[0]}
