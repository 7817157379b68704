"""Orbax checkpoints: train state + Grain iterator state in one composite item per step.

A stage writes `checkpoints/` (CheckpointManager, async, keep-last-k) while it trains and
`final/` (the effective model params, StandardCheckpointer) when it ends; later stages read
`final/`. Restores go onto the current mesh: every abstract leaf carries its current sharding.
A damaged newest step is still listed by orbax, so `restore_latest` falls back step by step.
"""

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True))

  def save(self, step: int, state, data_iter) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  def restore_latest(self, abstract_state, data_iter):
    """(step, state) of the newest readable step, or (0, None) if there is none.

    Unreadable newer steps are renamed aside (`<step>.unreadable`): left in place, they would
    make the save of that step number fail later (orbax: StepAlreadyExistsError).
    """
    unreadable = []
    result = 0, None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
        result = step, restored["state"]
        break
      except Exception as e:  # orbax raises many types for damaged files; fall back
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        unreadable.append(step)
    if unreadable:
      self._set_aside(unreadable)
    return result

  def _set_aside(self, steps) -> None:
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        aside = f"{path}.unreadable"
        n = 1
        while os.path.exists(aside):
          aside, n = f"{path}.unreadable{n}", n + 1
        os.replace(path, aside)
        logging.warning("moved unreadable checkpoint %s to %s", path, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("kstore_jax:set_aside_unreadable_checkpoints")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def save_params(directory: str, params) -> None:
  """Write final params (synchronously) to `directory` (must not exist)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), params)
  ckptr.wait_until_finished()
  ckptr.close()


def load_params(directory: str, abstract_params):
  """Read params written by save_params onto the shardings carried by `abstract_params`."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no final checkpoint at {directory!r}")
  ckptr = ocp.StandardCheckpointer()
  try:
    return ckptr.restore(os.path.abspath(directory), abstract_params)
  finally:
    ckptr.close()
