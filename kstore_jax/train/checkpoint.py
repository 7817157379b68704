"""Orbax checkpoints: train state + Grain iterator state in one composite item per step.

A stage writes `checkpoints/` (CheckpointManager, async, keep-last-k) while it trains and
`final/` (the effective model params, StandardCheckpointer) when it ends; later stages read
`final/`. Restores go onto the current mesh: every abstract leaf carries its current sharding.

Each step this code saves gets a manifest once orbax has committed it
(`<step>/kstore_manifest.json`: the size of every file of its `state` item), so a resume can
tell a damaged step (a file missing or cut short, unparsable metadata) from a failure that
has nothing to do with the files (an I/O error, out of memory, a state that does not fit the
current code). `restore_latest` sets only the former aside and falls back to an older step;
the latter stops the run with a one-line `CheckpointError` and leaves every step in place.
"""

import functools
import json
import logging
import os
import stat

import grain
import jax
import orbax.checkpoint as ocp

from kstore_jax import rundir
from kstore_jax.errors import ConfigError
from kstore_jax.rundir import DATA, STATE

MANIFEST = "kstore_manifest.json"


class CheckpointError(ConfigError):
  """A checkpoint step that is not shown damaged could not be restored. The message is one
  line naming the step and the cause (the command-line tools print it as their one-line error,
  exit status 2); no checkpoint was moved or removed, so a rerun retries the same step."""


@functools.cache
def use_array_handler() -> None:
  """Save jax.Arrays with replica-parallel writes only across processes.

  Orbax's default (outside CUDA) splits each replicated array among its replicas, every
  replica writing a slice cut on its device: one compiled `slice` per array shape and device.
  Within one process the same host writes the same bytes either way, so there it is off
  (measured: a 2-device process compiled 48 slices for one stage's saves, ~5 s of its CPU);
  across processes the replicas on other hosts share the writing, so there it stays on.
  Once per process (after the cluster is joined); orbax's warning that it replaces its own
  handler is not shown."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
        override=True)
  finally:
    absl_log.setLevel(level)


class Checkpointer:

  def __init__(self, directory: str, keep: int):
    use_array_handler()
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE, DATA),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True))
    self._unrecorded = []   # steps saved here whose manifest is not written yet

  def save(self, step: int, state, data_iter) -> None:
    # orbax's save waits for the previous save to finish anyway: wait here and record it
    self.manager.wait_until_finished()
    self._record()
    self.manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: grain.checkpoint.CheckpointSave(data_iter)}), force=True)
    self._unrecorded.append(step)

  def restore_latest(self, abstract_state, data_iter):
    """(step, state) of the newest step, or (0, None) if there is none.

    A step shown damaged (`damage`) is skipped for the next older one, and the damaged steps
    are renamed aside (`<step>.unreadable`): left in place, they would make the save of that
    step number fail later (orbax: StepAlreadyExistsError). A step not shown damaged that
    fails to restore (or whose files cannot be checked) raises CheckpointError naming the
    step and the cause; then nothing has been moved (damaged newer steps included), so a
    rerun after the cause is gone resumes from that step.
    """
    damaged = []
    result = 0, None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        why = self.damage(step)
      except OSError as e:
        raise CheckpointError(f"checkpoint step {step} in {self.directory}: its files could "
                              f"not be checked ({_cause(e)}); nothing was moved") from e
      if why is not None:
        logging.warning("checkpoint step %d in %s is unreadable: %s; trying an older one",
                        step, self.directory, why)
        damaged.append(step)
        continue
      try:
        result = step, self._restore(step, abstract_state, data_iter)
      except Exception as e:  # any cause: re-raised as one line naming the step, files kept
        path = os.path.join(self.directory, str(step))
        checked = ("its files have the sizes they were saved with"
                   if os.path.exists(os.path.join(path, MANIFEST)) else
                   "its files show no damage (it has no manifest of their sizes)")
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} could not be restored ({_cause(e)}); "
            f"{checked}, so nothing was moved: rerun once the cause is gone, or move {path} "
            "aside to resume from an older step") from e
      break
    if damaged:
      self._set_aside(damaged)
    return result

  def _restore(self, step: int, abstract_state, data_iter):
    foreign = self._data_state_of_other_process_count(step)
    if foreign is None:
      return self.manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state),
          DATA: grain.checkpoint.CheckpointRestore(data_iter)}))[STATE]
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state)}))
    data_iter.set_state(foreign)
    return restored[STATE]

  def damage(self, step: int) -> str | None:
    """How the files of `step` are shown damaged, or None when they are not.

    Damaged: with a manifest (written after orbax committed the step), a `state` file it
    lists is missing or has another size, or the manifest itself is unparsable; without one
    (a step saved before manifests existed, or one whose run was killed before writing it),
    `state/_METADATA` is missing; and, either way, `state/_METADATA` or a Grain state file
    (`data/process_*.json`, at least one) is missing or unparsable (not JSON, not even
    text). Grain's files are not in the manifest: a run resumed with another process count
    reads any of them. Any other OSError on a file (it exists but cannot be read, or its stat
    fails: EIO, ESTALE, EACCES) is raised: not damage, maybe transient.
    """
    path = os.path.join(self.directory, str(step))
    if not _is(path, stat.S_ISDIR):
      return "its directory is missing"
    manifest = os.path.join(path, MANIFEST)
    if _stat(manifest) is not None:
      try:
        sizes = json.loads(_read(manifest))["files"]
        sizes = {str(k): int(v) for k, v in sizes.items()}
      except (ValueError, KeyError, TypeError, AttributeError):   # UnicodeDecodeError too
        return f"its manifest {MANIFEST} is unparsable"
      for rel, size in sorted(sizes.items()):
        st = _stat(os.path.join(path, rel))
        if st is None or not stat.S_ISREG(st.st_mode):
          return f"{rel} is missing"
        if st.st_size != size:
          return f"{rel} has {st.st_size} bytes, {size} when saved"
    jsons = [os.path.join(STATE, "_METADATA")]
    data_dir = os.path.join(path, DATA)
    states = sorted(n for n in os.listdir(data_dir) if n.startswith("process_")
                    and n.endswith(".json")) if _is(data_dir, stat.S_ISDIR) else []
    if not states:
      return "data/ holds no Grain state (process_*.json)"
    jsons += [os.path.join(DATA, n) for n in states]
    for rel in jsons:
      file = os.path.join(path, rel)
      if not _is(file, stat.S_ISREG):
        return f"{rel} is missing"
      try:
        json.loads(_read(file))
      except ValueError:   # UnicodeDecodeError too: bytes that are not text
        return f"{rel} is unparsable"
    return None

  def _record(self) -> None:
    """Write the manifest of every step saved here since the last call (process 0; call once
    orbax has finished them: a step directory exists only once committed). A step that
    max_to_keep has removed meanwhile is skipped."""
    if jax.process_index() == 0:
      for step in self._unrecorded:
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path):
          write_manifest(path)
    self._unrecorded = []

  def _data_state_of_other_process_count(self, step: int):
    """The Grain state of `step` when it was saved by a different number of processes.

    Grain names its file `process_<i>-of-<n>.json` and restores only that name, so a run
    resumed on another host count would find none and restart from scratch. Every process
    iterates the same global batch stream and slices its rows off at the end (a stateless
    map), so any process's state is every process's state: read the first one. None when
    this process's own file exists (or there is no state at all: the normal restore fails).
    """
    data_dir = os.path.join(self.directory, str(step), DATA)
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isdir(data_dir) or os.path.exists(os.path.join(data_dir, own)):
      return None
    others = sorted(n for n in os.listdir(data_dir)
                    if n.startswith("process_") and n.endswith(".json"))
    if not others:
      return None
    logging.warning("checkpoint step %d was saved by another process count (%s); resuming "
                    "its data iterator from that state", step, others[0])
    return rundir.read_json(os.path.join(data_dir, others[0]))

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
    """Block until the pending save is committed, and write its manifest."""
    self.manager.wait_until_finished()
    self._record()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def write_manifest(step_dir: str) -> None:
  """`<step_dir>/kstore_manifest.json`: {"files": {path under step_dir: size}} of every file
  of the step's `state` item, written atomically (a temporary file renamed)."""
  state = os.path.join(step_dir, STATE)
  sizes = {}
  for root, _, names in os.walk(state):
    for n in names:
      file = os.path.join(root, n)
      sizes[os.path.relpath(file, step_dir)] = os.path.getsize(file)
  rundir.write_json(os.path.join(step_dir, MANIFEST), {"files": sizes}, indent=1)


def _stat(path: str) -> os.stat_result | None:
  """os.stat of `path`, None when it does not exist (a missing component, or one that is a
  file). Any other OSError is raised: os.path.exists and co. would read an I/O error as
  "missing", and a step's intact files would be set aside over a transient fault."""
  try:
    return os.stat(path)
  except (FileNotFoundError, NotADirectoryError):
    return None


def _is(path: str, kind) -> bool:
  """Whether `path` exists and is of `kind` (stat.S_ISDIR, stat.S_ISREG); _stat's errors."""
  st = _stat(path)
  return st is not None and kind(st.st_mode)


def _read(path: str) -> bytes:
  """The bytes of `path`: json.loads decodes them inside the caller's parse check, so a file
  that is not text counts as unparsable (UnicodeDecodeError is a ValueError)."""
  with open(path, "rb") as f:
    return f.read()


def _cause(e: BaseException) -> str:
  """`Type: first line of the message` (at most 200 characters of it)."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def save_params(directory: str, params) -> None:
  """Write final params (synchronously) to `directory` (must not exist)."""
  use_array_handler()
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
