"""The training loop of one stage: Grain batches -> jitted step on the mesh -> metrics,
checkpoints (with the data iterator), NaN guard, SIGTERM/SIGINT save, final params export."""

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import kstore_jax
from kstore_jax import heap
from kstore_jax.train import checkpoint, metrics as metrics_lib, optim, sharding, step as step_lib

# Dense peak FLOP/s by device kind (datasheets) and compute dtype, for MFU; float32 on a GPU
# runs XLA's default-precision matmuls as TF32. Longest matching kind wins; absent: no MFU.
PEAK_FLOPS = {
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},       # SXM ("NVIDIA H100 80GB HBM3")
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},                   # v5e
    "TPU v5p": {"bfloat16": 459e12}, "TPU v5": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},                   # v6e (Trillium)
}


class NonFiniteLoss(RuntimeError):
  pass


class Interrupted(RuntimeError):
  pass


def device_peak_flops(dtype: str) -> float | None:
  """Summed dense peak FLOP/s of all devices for compute `dtype` (PEAK_FLOPS), or None."""
  kind = jax.devices()[0].device_kind
  for k, v in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if k in kind:
      return v[dtype] * jax.device_count() if dtype in v else None
  return None


@dataclasses.dataclass
class StageSpec:
  """What a training stage optimises; built by main from the config."""
  name: str
  stage_cfg: Any
  loss_fn: Callable            # (params, frozen, batch) -> (loss, aux)
  init_params: Callable        # rng -> params (may be boxed with logical partitioning)
  frozen: Any                  # already-sharded pytree the loss reads but does not train
  data: Callable               # (process_index, process_count) -> grain IterDataset of batches
  positions_per_step: int      # token positions in one global batch (for tokens/s)
  flops_per_position: float
  export: Callable             # (params, frozen) -> effective model params for final/
  eval_fn: Callable | None = None   # effective params -> {name: float}, run every eval_every
  dtype: str = "float32"       # the model's compute dtype (the MFU's peak)


def _fmt_time(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Signals:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step and stops."""

  def __init__(self):
    self.caught = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.caught = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def build_state(spec: StageSpec, mesh, seed: int):
  """Sharded initial state via eval_shape -> logical shardings -> jit(init, out_shardings)."""
  optimizer = optim.make_optimizer(spec.stage_cfg)

  def init_boxed(rng):
    params = spec.init_params(rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(params)}

  rng = jax.random.PRNGKey(seed)
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(mesh):
    abstract_boxed = jax.eval_shape(init_boxed, rng)
    shardings = sharding.logical_shardings(abstract_boxed, mesh)
    init = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings)
    abstract = jax.eval_shape(init, rng)
    return init, rng, abstract, shardings, optimizer


def compile_stage(spec: StageSpec, mesh, seed: int):
  """(init, rng, abstract state, state shardings, jitted train_step(state, frozen, batch))."""
  init, rng, abstract, shardings, optimizer = build_state(spec, mesh, seed)
  frozen_sh = jax.tree.map(lambda x: x.sharding, spec.frozen)
  train_step = jax.jit(
      step_lib.make_train_step(spec.loss_fn, optimizer, optim.schedule(spec.stage_cfg)),
      in_shardings=(shardings, frozen_sh, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return init, rng, abstract, shardings, train_step


def run_stage(spec: StageSpec, cfg, stage_dir: str, mesh) -> Any:
  """Train (or resume) a stage; write final/ and return the effective params."""
  sc, tc = spec.stage_cfg, cfg.train
  is_main = jax.process_index() == 0
  os.makedirs(stage_dir, exist_ok=True)
  init, rng, abstract, shardings, train_step = compile_stage(spec, mesh, cfg.seed)

  data_iter = iter(spec.data(jax.process_index(), jax.process_count()))
  ckpt = checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"), tc.keep_checkpoints)
  start, state = ckpt.restore_latest(checkpoint.abstract_with_shardings(abstract, shardings),
                                     data_iter)
  if state is None:
    state = init(rng)
  elif is_main:
    print(f"[{spec.name}] resumed from step {start}", flush=True)
  writer = metrics_lib.MetricsWriter(stage_dir, start, enabled=is_main)
  positions_per_step = spec.positions_per_step
  peak = device_peak_flops(spec.dtype)

  bound = heap.Bound(kstore_jax.RETAINS_FREED_MEMORY)   # CPU: freed memory kept, bounded
  pending = None   # (step, device metrics) fetched one step behind
  t_last, step_last = time.time(), start
  t_start = time.time()

  def log(step, device_metrics):
    nonlocal t_last, step_last
    values = jax.device_get(device_metrics)
    if not all(math.isfinite(float(v)) for v in values.values()):
      raise NonFiniteLoss(f"[{spec.name}] non-finite loss/gradient at step {step} "
                          f"(loss={float(values['loss'])}); last good checkpoint kept")
    now = time.time()
    tps = (step - step_last) * positions_per_step / max(now - t_last, 1e-9)
    t_last, step_last = now, step
    values = {k: float(v) for k, v in values.items()}
    values.update(tokens_per_s=tps, step_time_s=positions_per_step / max(tps, 1e-9),
                  flops_per_s=tps * spec.flops_per_position)
    if peak:
      values["mfu"] = values["flops_per_s"] / peak
    writer.write(step, values)
    if is_main:
      eta = (sc.steps - step) * values["step_time_s"]
      print(f"[{spec.name}] step {step}/{sc.steps} loss {values['loss']:.4f} "
            f"lr {values['lr']:.2e} {tps / 1e3:.1f}k tok/s ETA {_fmt_time(eta)}", flush=True)

  step = start
  try:
    with _Signals() as signals:
      while step < sc.steps:
        batch = sharding.to_global(next(data_iter), mesh)
        state, device_metrics = train_step(state, spec.frozen, batch)
        if step == start:   # the heap bound measures a completed step's working set
          jax.block_until_ready(device_metrics)
        bound.after_step()
        step += 1
        if pending is not None:
          log(*pending)
          pending = None
        if step % tc.log_every == 0 or step == sc.steps:
          pending = (step, device_metrics)
        boundary = step % tc.save_every == 0 or step == sc.steps or signals.caught
        if boundary and pending is not None:
          log(*pending)   # never save a state whose loss was not checked
          pending = None
        if boundary:
          ckpt.save(step, state, data_iter)
        if spec.eval_fn and tc.eval_every and step % tc.eval_every == 0:
          writer.write(step, spec.eval_fn(spec.export(state["params"], spec.frozen)))
        if signals.caught:
          ckpt.wait()
          raise Interrupted(f"[{spec.name}] {signals.caught} at step {step}; checkpoint saved")
  finally:
    ckpt.close()
    writer.close()
  params = spec.export(state["params"], spec.frozen)
  checkpoint.save_params(os.path.join(stage_dir, "final"), params)
  if is_main:
    print(f"[{spec.name}] done: {sc.steps} steps in {_fmt_time(time.time() - t_start)}",
          file=sys.stdout, flush=True)
  return params
