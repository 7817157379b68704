"""The layout of a run directory, and reading and writing its files: the one place that names them.

    WORKDIR/                        what `python -m kstore_jax.main --workdir=WORKDIR` writes
      config.json                   CONFIG: the run's config (checked on resume)
      tokenizer.json                TOKENIZER
      world.json                    WORLD: {"digest": the data's World.digest} (checked on resume)
      results.json                  RESULTS: {key: value, ..., "produced_by": {key: stage}}
      .lock, .lock.<i>              lock_name(i): one per process of the run
      <stage>/                      stage_dir(WORKDIR, stage), one per trained stage
        metrics.jsonl               METRICS: one JSON object per logged step (read_metrics)
        checkpoints/<step>/         CHECKPOINTS: STATE (orbax train state) and DATA (Grain state)
        final/                      FINAL: the effective params; its presence marks the stage done
        profile/                    PROFILE: a jax.profiler trace (train.profile_steps)
        events.out.tfevents.*       TensorBoard (tensorboardX names them)
    GRID_DIR/                       what `python -m kstore_jax.grid --workdir=GRID_DIR` writes
      grid.json                     GRID: the runs in order, each one's row and method
      <run>/                        a run directory as above

JSON files are written atomically (a temporary file renamed over the old one), so a kill leaves
the old file or the new one. Imports nothing of kstore_jax but errors, and no jax: the report
reads runs without it.
"""

import fcntl
import json
import os
import re

from kstore_jax.errors import ConfigError

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WORLD = "world.json"
RESULTS = "results.json"
GRID = "grid.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
PROFILE = "profile"
STATE = "state"      # checkpoints/<step>/STATE: the orbax train state item
DATA = "data"        # checkpoints/<step>/DATA: the Grain iterator state item
PRODUCED_BY = "produced_by"   # results.json: {key: the stage that wrote it}
CI = "_ci"           # results.json: key + CI holds the 95% intervals of key's accuracies


def ci_bounds(leaf) -> tuple[float, float] | None:
  """(lo, hi) of an interval leaf of a results.json `<key>_ci` entry ({"lo", "hi", "n"}), None
  when `leaf` is not one."""
  lo, hi = (leaf.get("lo"), leaf.get("hi")) if isinstance(leaf, dict) else (None, None)
  return (lo, hi) if all(isinstance(x, (int, float)) for x in (lo, hi)) else None


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def checkpoints_dir(stage_dir_: str) -> str:
  return os.path.join(stage_dir_, CHECKPOINTS)


def final_dir(stage_dir_: str) -> str:
  return os.path.join(stage_dir_, FINAL)


def metrics_file(stage_dir_: str) -> str:
  return os.path.join(stage_dir_, METRICS)


def is_done(stage_dir_: str) -> bool:
  """A training or probing stage is done when its final/ params exist."""
  return os.path.isdir(final_dir(stage_dir_))


def lock_name(process_index: int) -> str:
  """`.lock` for process 0, `.lock.<i>` for the others: the processes of one multi-process run
  share the workdir (same node or a shared filesystem) and must not exclude each other."""
  return ".lock" if process_index == 0 else f".lock.{process_index}"


def is_run(path: str) -> bool:
  """Whether `path` is a run directory: main's config.json and world.json in it."""
  return all(os.path.isfile(os.path.join(path, f)) for f in (CONFIG, WORLD))


def check_writable(path: str, flag: str) -> None:
  """ConfigError naming `flag`=`path` where this process cannot make or write in the
  directory `path`: the nearest existing path at or above it is a file, or a directory it
  cannot write (a NotADirectoryError or PermissionError traceback at the first write)."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{flag}={path}: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag}={path}: {existing} is not writable")


def check_workdir(workdir: str, holds: str = "run") -> None:
  """ConfigError (one line, checked before anything is written, on the path as given) when
  `workdir` is a URL (`gs://...`: the run directory is read and written as local files; it
  made a directory `gs:/...` here and failed at the first save), exists and is no directory,
  lies under a file or in a directory this process cannot write, or would nest one
  experiment in another: a run (`holds` "run") in a grid's own directory or a grid (`holds`
  "grid") in a run's, either inside a run's directory (up to three levels down: a stage's,
  its checkpoints'). A grid's runs are its subdirectories, each a run directory main may resume."""
  if re.match(r"^[a-zA-Z][\w+.-]*://", workdir):
    raise ConfigError(f"--workdir={workdir}: a URL; give a local path (a bucket mounted with "
                      "gcsfuse, say)")
  check_writable(workdir, "--workdir")   # (a file there too)
  path = os.path.abspath(workdir)
  if holds == "run" and os.path.isfile(os.path.join(path, GRID)):
    raise ConfigError(f"--workdir={workdir} holds a grid ({GRID}); its runs are its "
                      "subdirectories")
  if holds == "grid" and is_run(path):
    raise ConfigError(f"--workdir={workdir} holds a run ({CONFIG}), not a grid")
  above = path
  for _ in range(3):
    above = os.path.dirname(above)
    if is_run(above):
      raise ConfigError(f"--workdir={workdir} is inside the run directory {above}")


def lock(workdir: str, process_index: int):
  """Take this process's exclusive lock of `workdir` (created if missing); the open lock file
  (keep it open: closing it releases the lock). ConfigError when another run holds it."""
  os.makedirs(workdir, exist_ok=True)
  held = open(os.path.join(workdir, lock_name(process_index)), "a")   # "w" would touch a held lock
  try:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    held.close()
    raise ConfigError(f"--workdir={workdir}: locked by another running experiment") from None
  return held


def read_json(path: str) -> dict:
  """The JSON object in `path` (every JSON file of a run is one): ConfigError naming the file
  where it holds no JSON (cut short, not UTF-8, hand-edited) or another value (`[1, 2, 3]`:
  its readers failed on their first key); OSError as `open` raises it."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    obj = json.loads(data)
  except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
    raise ConfigError(f"{path}: not a JSON file ({str(e).splitlines()[0][:200]})") from None
  if not isinstance(obj, dict):
    raise ConfigError(f"{path}: not a JSON object (it holds {json.dumps(obj)[:60]})")
  return obj


def write_json(path: str, obj, indent: int = 2, sort_keys: bool = True) -> None:
  """Write `obj` as JSON to `path` atomically (write_atomic)."""
  write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def write_atomic(path: str, text: str) -> None:
  """Write `text` to `path` atomically: a temporary file of this process's own renamed over
  it (processes writing the same file at once each rename a whole file; a kill leaves the
  old file or the new one; the data reaches the disk before the rename, so a crash of the
  machine does not either)."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl, in order; a line that is not a JSON object (blank, cut
  short by a kill, or bytes UTF-8 cannot decode) is skipped. [] when the file does not
  exist."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, errors="replace") as f:   # a bad byte spoils its line only
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def metrics_step(row: dict) -> int | None:
  """The step of a metrics row; None when it has none."""
  try:
    return int(row["step"])
  except (KeyError, TypeError, ValueError):
    return None
