"""checkpoint.Checkpointer in-process on a toy state: the size manifest written once a step is
committed, which steps count as damaged (set aside, older step restored) and which failures
stop the resume instead (CheckpointError, every file left as it was). The same through
`python -m kstore_jax.main`: tests/test_train.py."""

import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import runs

from kstore_jax.configlib import ConfigError
from kstore_jax.train import checkpoint

STEPS = (1, 2)


def data_iter():
  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def toy_state(step: int) -> dict:
  return {"step": jnp.int32(step),
          "params": {"w": jnp.full((64, 64), float(step)), "b": jnp.arange(64.0) * step}}


def abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      toy_state(0))


@pytest.fixture
def ckpt_dir(tmp_path) -> pathlib.Path:
  """Steps 1 and 2 (the data iterator one batch further at each), saved as a stage does."""
  d = tmp_path / "checkpoints"
  it = data_iter()
  c = checkpoint.Checkpointer(str(d), keep=2)
  for step in STEPS:
    next(it)
    c.save(step, toy_state(step), it)
  c.close()
  return d


def restore(d):
  """(step, state, the data iterator's next batch) of Checkpointer.restore_latest."""
  it = data_iter()
  c = checkpoint.Checkpointer(str(d), keep=2)
  try:
    step, state = c.restore_latest(abstract(), it)
  finally:
    c.close()
  return step, state, next(it)


def digest(d: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
          else "dir" for p in sorted(d.rglob("*"))}


def largest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def test_manifest_lists_every_state_file_with_its_size(ckpt_dir):
  for step in STEPS:
    step_dir = ckpt_dir / str(step)
    files = json.loads((step_dir / checkpoint.MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(step_dir)): p.stat().st_size
               for p in (step_dir / "state").rglob("*") if p.is_file()}
    assert files == on_disk and "state/_METADATA" in files
  # The manifest is ignored by orbax: the newest step restores, data iterator included.
  step, state, batch = restore(ckpt_dir)
  assert step == 2 and int(state["step"]) == 2 and float(state["params"]["w"][0, 0]) == 2.0
  assert batch.tolist() == [8, 9, 10, 11]


NOT_TEXT = b"\xff\xfe\x00garbage"   # a block of garbage after a crash: not even UTF-8


@pytest.mark.parametrize("damage", ["truncate", "delete", "grain_state", "metadata",
                                    "grain_state_not_text", "manifest_not_text"])
def test_damaged_newest_step_is_set_aside(ckpt_dir, damage):
  newest = ckpt_dir / "2"
  if damage == "truncate":
    victim = largest_state_file(newest)
    victim.write_bytes(victim.read_bytes()[:5])
  elif damage == "delete":
    victim = largest_state_file(newest)
    victim.unlink()
  elif damage == "grain_state":
    victim = newest / "data" / "process_0-of-1.json"
    victim.write_text("{")
    (newest / checkpoint.MANIFEST).unlink()   # without a manifest too
  elif damage == "grain_state_not_text":
    victim = newest / "data" / "process_0-of-1.json"
    victim.write_bytes(NOT_TEXT)
  elif damage == "manifest_not_text":
    victim = newest / checkpoint.MANIFEST
    victim.write_bytes(NOT_TEXT)
  else:
    victim = newest / "state" / "_METADATA"
    victim.write_text(victim.read_text()[:20])
  rel = str(victim.relative_to(newest))
  why = checkpoint.Checkpointer(str(ckpt_dir), keep=2).damage(2)
  assert why is not None and rel in why, why
  step, state, batch = restore(ckpt_dir)
  assert step == 1 and int(state["step"]) == 1 and batch.tolist() == [4, 5, 6, 7]
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2.unreadable"]


@pytest.mark.parametrize("manifest", [True, False])
def test_restore_error_of_an_intact_step_stops_and_moves_nothing(ckpt_dir, monkeypatch,
                                                                 manifest):
  if not manifest:   # a step saved before manifests existed
    (ckpt_dir / "2" / checkpoint.MANIFEST).unlink()
  before = digest(ckpt_dir)

  def failing_restore(self, step, *args, **kwargs):
    raise OSError(5, f"Input/output error (injected at step {step})")

  with monkeypatch.context() as m:
    m.setattr(ocp.CheckpointManager, "restore", failing_restore)
    with pytest.raises(checkpoint.CheckpointError) as e:
      restore(ckpt_dir)
  msg = str(e.value)
  assert isinstance(e.value, ConfigError)   # the tools print it as their one-line error
  assert "\n" not in msg and "checkpoint step 2 " in msg, msg
  assert "OSError: [Errno 5] Input/output error (injected at step 2)" in msg, msg
  assert ("sizes they were saved with" if manifest else "no manifest") in msg, msg
  assert digest(ckpt_dir) == before
  # Once the cause is gone, the same step restores.
  step, state, batch = restore(ckpt_dir)
  assert step == 2 and np.asarray(state["params"]["b"]).tolist() == (np.arange(64.0) * 2).tolist()
  assert batch.tolist() == [8, 9, 10, 11]


@pytest.mark.parametrize("victim, code", [("state/_METADATA", errno.EIO),
                                          ("data/process_0-of-1.json", errno.ESTALE),
                                          (checkpoint.MANIFEST, errno.EACCES)])
def test_stat_error_is_not_damage(ckpt_dir, monkeypatch, victim, code):
  """A file of the newest step whose stat fails with an error other than "not found" (an NFS
  or gcsfuse hiccup) cannot be checked: the resume stops with the one-line CheckpointError
  naming the step and the cause, every step left in place; once the fault is gone, it
  resumes from that step."""
  before = digest(ckpt_dir)
  real_stat = os.stat
  faulty = str(ckpt_dir / "2" / victim)

  def flaky_stat(path, *args, **kwargs):
    if os.fspath(path) == faulty:
      raise OSError(code, os.strerror(code), faulty)
    return real_stat(path, *args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(os, "stat", flaky_stat)
    with pytest.raises(checkpoint.CheckpointError) as e:
      restore(ckpt_dir)
  msg = str(e.value)
  assert "\n" not in msg and "checkpoint step 2 " in msg and os.strerror(code) in msg, msg
  assert digest(ckpt_dir) == before
  step, state, batch = restore(ckpt_dir)
  assert step == 2 and int(state["step"]) == 2 and batch.tolist() == [8, 9, 10, 11]


# The failed orbax restore leaves its asynchronous reads behind; their "Exception ignored in"
# reports (a coroutine closed by the collector, a callback into the closed event loop) are
# orbax's clean-up, not this test's result (setup.cfg ignores the coroutine report wherever the
# collector gets to it later).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_state_that_does_not_fit_the_code_is_not_damage(ckpt_dir):
  """A code change (here: a parameter of another shape) fails the restore of intact files."""
  before = digest(ckpt_dir)
  wrong = jax.tree.map(lambda x: x, abstract())
  wrong["params"]["b"] = jax.ShapeDtypeStruct((65,), jnp.float32,
                                              sharding=wrong["params"]["b"].sharding)
  c = checkpoint.Checkpointer(str(ckpt_dir), keep=2)
  try:
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint step 2 "):
      c.restore_latest(wrong, data_iter())
  finally:
    c.close()
  assert digest(ckpt_dir) == before


SAVE_ON_TWO_DEVICES = """
import logging, sys
import jax, jax.numpy as jnp, numpy as np
compiled = []
class Log(logging.Handler):
  def emit(self, record):
    if record.getMessage().startswith("Finished XLA compilation of jit(slice)"):
      compiled.append(record.getMessage())
for name in ("jax._src.dispatch", "jax._src.compiler"):
  logging.getLogger(name).setLevel(logging.DEBUG)
  logging.getLogger(name).addHandler(Log())
from kstore_jax.train import checkpoint
rep = jax.sharding.NamedSharding(jax.make_mesh((2,), ("data",)), jax.sharding.PartitionSpec())
params = {f"w{i}": jax.device_put(jnp.arange(64.0 * (8 + i)).reshape(8 + i, 64), rep)
          for i in range(4)}
checkpoint.save_params(sys.argv[1], params)
back = checkpoint.load_params(sys.argv[1], checkpoint.abstract_with_shardings(
    params, jax.tree.map(lambda _: rep, params)))
assert all((np.asarray(back[k]) == np.asarray(params[k])).all() for k in params)
print(len(compiled))
"""


def test_one_process_saves_replicated_arrays_without_slicing_them(tmp_path):
  """One process over two devices writes each replicated array whole: orbax's replica-parallel
  default cut it on a device first, one compiled slice per shape and device (8 here)."""
  out = subprocess.run([sys.executable, "-c", SAVE_ON_TWO_DEVICES, str(tmp_path / "p")],
                       env=runs.env(n_devices=2), capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "0", out.stdout
