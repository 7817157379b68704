"""Orbax checkpoints: train state + Grain iterator state in one composite item per step.

A stage writes `checkpoints/` (CheckpointManager, async, keep-last-k) while it trains and
`final/` (the effective model params, StandardCheckpointer) when it ends; later stages read
`final/`. Restores go onto the current mesh: every abstract leaf carries its current sharding.
A damaged newest step is still listed by orbax, so `restore_latest` falls back step by step.
"""

import json
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
        foreign = self._data_state_of_other_process_count(step)
        if foreign is None:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=grain.checkpoint.CheckpointRestore(data_iter)))
        else:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state)))
          data_iter.set_state(foreign)
        result = step, restored["state"]
        break
      except Exception as e:  # orbax raises many types for damaged files; fall back
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        unreadable.append(step)
    if unreadable:
      self._set_aside(unreadable)
    return result

  def _data_state_of_other_process_count(self, step: int):
    """The Grain state of `step` when it was saved by a different number of processes.

    Grain names its file `process_<i>-of-<n>.json` and restores only that name, so a run
    resumed on another host count would find none and restart from scratch. Every process
    iterates the same global batch stream and slices its rows off at the end (a stateless
    map), so any process's state is every process's state: read the first one. None when
    this process's own file exists (or there is no state at all: the normal restore fails).
    """
    data_dir = os.path.join(self.directory, str(step), "data")
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isdir(data_dir) or os.path.exists(os.path.join(data_dir, own)):
      return None
    others = sorted(n for n in os.listdir(data_dir)
                    if n.startswith("process_") and n.endswith(".json"))
    if not others:
      return None
    logging.warning("checkpoint step %d was saved by another process count (%s); resuming "
                    "its data iterator from that state", step, others[0])
    with open(os.path.join(data_dir, others[0])) as f:
      return json.load(f)

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
