"""Multi-host correctness with real processes: two local `python -m kstore_jax.main` processes
joined by `jax.distributed.initialize` (KSTORE_NUM_PROCESSES / KSTORE_PROCESS_ID /
KSTORE_COORDINATOR, a localhost coordinator, one CPU device each, gloo collectives) train the
same losses as one process with two devices and the same global batch; their checkpoint
resumes on two processes and on one. The runs go on to train and score the P- and Q-probes
(probe batches through the same process slicing, padded to a row count both meshes divide),
with the one-process losses and accuracies.
Hosts that share rows: two processes of two devices each under a mesh whose tensor axis spans
both (data=fsdp=1, tensor=4: every device holds every row), running a grid of two copies of
the reference run (batches stacked over runs), train the same losses and probes as the
one-process reference.

The runs share one persistent JAX compilation cache (it changes no number) and a
module-scoped fixture; the model is the tiny one of test_train.py.
"""

import json
import pathlib
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from runs import DETERMINISTIC, env as run_env, python as run_python, small_run_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, PROBE_STEPS = 12, 6, 4
STAGES = ("pretrain", "pprobe", "qprobe")
# Pretraining, then both probes (a few steps at batch 7, which neither 2 devices nor 2
# processes divide: padded to 8 rows, one of them weighing nothing; data/probing.py).
ARGS = ["--config=configs/single.py:tiny",
        *(a for a in small_run_args(STEPS, SAVE_EVERY) if not a.startswith("--config.stages")),
        f"--config.stages={','.join(STAGES)}",
        *(f"--config.{p}.{k}={v}" for p in STAGES[1:]
          for k, v in (("steps", PROBE_STEPS), ("batch_size", 7), ("warmup_steps", 1)))]
# The resumes: pretraining alone (a stage list may change on resume, the probe keys may not).
PRETRAIN_ARGS = [("--config.stages=pretrain" if a.startswith("--config.stages") else a)
                 for a in ARGS]
# (the P-probe alone: the Q-probe's batches have the same layout and take the same slicing)
SHARED_ROWS_MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=4",
                    "--config.stages=pretrain,pprobe"]
RUN_AXIS_DATA_MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2",
                      "--config.grid.run_axis=data", "--config.stages=pretrain"]
TIMEOUT = 300


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir, log, env, args=ARGS, program="kstore_jax.main") -> subprocess.Popen:
  return subprocess.Popen([run_python(), "-m", program, f"--workdir={workdir}", *args],
                          cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def start_one(workdir, cache, n_devices=2, args=ARGS) -> list:
  """One process with n_devices fake CPU devices: [(proc, log)]."""
  log = pathlib.Path(f"{workdir}.log")
  return [(start(workdir, log, run_env(cache, n_devices), args), log)]


def start_two(workdir, cache, n_devices=1, args=ARGS, program="kstore_jax.main") -> list:
  """Two processes of one JAX cluster, n_devices CPU devices each, sharing `workdir`."""
  port, runs = free_port(), []
  for i in range(2):
    log = pathlib.Path(f"{workdir}.p{i}.log")
    env = run_env(cache, n_devices, KSTORE_NUM_PROCESSES="2", KSTORE_PROCESS_ID=str(i),
                  KSTORE_COORDINATOR=f"localhost:{port}")
    runs.append((start(workdir, log, env, args, program), log))
  return runs


def finish(*groups) -> list[str]:
  """Wait for every process; all must exit 0 (a failed peer leaves the other blocked in a
  collective, so on any failure or timeout the rest are killed). Returns the logs' texts."""
  runs = [r for g in groups for r in g]
  deadline = time.time() + TIMEOUT
  try:
    while any(p.poll() is None for p, _ in runs):
      failed = [p for p, _ in runs if p.returncode not in (None, 0)]
      if failed or time.time() > deadline:
        break
      time.sleep(0.1)
  finally:
    for p, _ in runs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [log.read_text() for _, log in runs]
  for (p, log), text in zip(runs, texts):
    assert p.returncode == 0, f"{log.name}: exit {p.returncode}\n{text[-3000:]}"
  return texts


def metrics(workdir, stage="pretrain") -> list[dict]:
  path = pathlib.Path(workdir) / stage / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def deterministic(rows) -> list[tuple]:
  return [tuple(r[k] for k in DETERMINISTIC) for r in rows]


def assert_close_losses(got, want, rtol=1e-5):
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    rel = abs(g["loss"] - w["loss"]) / abs(w["loss"])
    assert rel <= rtol, f"step {g['step']}: loss {g['loss']} vs {w['loss']} (rel {rel:.2e})"
  assert [r.get("loss_tokens") for r in got] == [r.get("loss_tokens") for r in want]


def stopped_after_first_checkpoint(src, dst) -> None:
  """`dst`: a copy of the finished run `src` as if it had died right after the step-6 save."""
  shutil.copytree(src, dst)
  shutil.rmtree(dst / "pretrain" / "final")
  shutil.rmtree(dst / "pretrain" / "checkpoints" / str(STEPS))
  path = dst / "pretrain" / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in metrics(dst) if r["step"] <= SAVE_EVERY))


# -- shared runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, jax_cache):
  """The one-process reference (2 devices) and the two-process run (1 device each), side by
  side: the global device count and the global batch are the same."""
  base = tmp_path_factory.mktemp("multiprocess")
  one, two = start_one(base / "one", jax_cache), start_two(base / "two", jax_cache)
  logs = finish(one, two)
  return {"one": base / "one", "two": base / "two", "logs": logs}


# -- tests ----------------------------------------------------------------------------------
def test_two_processes_match_one(runs):
  one, two = runs["one"], runs["two"]
  rows1, rows2 = metrics(one), metrics(two)
  assert [r["step"] for r in rows2] == list(range(1, STEPS + 1))
  assert_close_losses(rows2, rows1)
  # Process 0 writes the run files once; each process holds its own lock file.
  assert (two / "config.json").is_file() and (two / "tokenizer.json").is_file()
  assert (two / ".lock").exists() and (two / ".lock.1").exists()
  assert (two / "pretrain" / "final").is_dir()
  assert "[pretrain] done: 12 steps" in runs["logs"][1]          # process 0's log
  assert "[pretrain]" not in runs["logs"][2]                     # process 1 prints nothing
  # Each process saved its Grain state; both iterate the one global stream, so they agree.
  for step in (SAVE_EVERY, STEPS):
    data = two / "pretrain" / "checkpoints" / str(step) / "data"
    states = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0] == states[1], states


def assert_same_probes(got_dir, want_dir, stages=STAGES[1:]):
  """The probe `stages`' training losses and results (accuracies, the majority baseline) of
  two runs agree."""
  got, want = (json.loads((d / "results.json").read_text()) for d in (got_dir, want_dir))
  for stage in stages:
    rows = metrics(got_dir, stage)
    assert [r["step"] for r in rows] == list(range(1, PROBE_STEPS + 1)), stage
    assert_close_losses(rows, metrics(want_dir, stage))
    if stage == "pprobe":   # a position x attribute matrix
      np.testing.assert_allclose(got[stage], want[stage], atol=1e-6)
    else:
      assert got[stage] == pytest.approx(want[stage], abs=1e-6), stage
  assert got["probe_baseline"] == pytest.approx(want["probe_baseline"], abs=1e-6)


def test_two_processes_probe_like_one(runs):
  # Probe batches (tokens, segment_ids, probe_at, labels) through the same process slicing.
  assert_same_probes(runs["two"], runs["one"])
  assert "[pprobe]" in runs["logs"][1] and "[qprobe]" in runs["logs"][1]


def test_two_processes_resume_from_their_checkpoint(runs, tmp_path, jax_cache):
  # Process 0 prints the resume; process 1 cannot silently start over: its step count would
  # no longer match process 0's collectives, and its half of every batch (and its replica of
  # the state) would change the losses, which must equal the uninterrupted run's bit for bit.
  wd = tmp_path / "resumed2"
  stopped_after_first_checkpoint(runs["two"], wd)
  logs = finish(start_two(wd, jax_cache, args=PRETRAIN_ARGS))
  assert f"resumed from step {SAVE_EVERY}" in logs[0], logs[0][-2000:]
  assert deterministic(metrics(wd)) == deterministic(metrics(runs["two"]))
  assert (wd / "pretrain" / "final").is_dir()


def test_one_process_resumes_a_two_process_checkpoint(runs, tmp_path, jax_cache):
  wd = tmp_path / "resumed1"
  stopped_after_first_checkpoint(runs["two"], wd)
  (log,) = finish(start_one(wd, jax_cache, args=PRETRAIN_ARGS))
  assert f"resumed from step {SAVE_EVERY}" in log, log[-2000:]
  assert "saved by another process count" in log, log[-2000:]
  rows = metrics(wd)
  assert deterministic(rows[:SAVE_EVERY]) == deterministic(metrics(runs["two"])[:SAVE_EVERY])
  assert_close_losses(rows, metrics(runs["two"]))
  assert_close_losses(rows, metrics(runs["one"]))
  assert (wd / "pretrain" / "final").is_dir()




def test_clock_saves_of_two_processes_fall_on_log_steps(runs, tmp_path, jax_cache):
  """train.save_minutes with several processes: process 0's clock decides, at log steps (the
  processes' clocks differ: one saving alone would leave the other in the step's collectives);
  the saves change no loss."""
  wd = tmp_path / "clock2"
  finish(start_two(wd, jax_cache, args=[
      *PRETRAIN_ARGS, "--config.train.save_every=1000", "--config.train.save_minutes=1e-9",
      "--config.train.log_every=4", f"--config.train.keep_checkpoints={STEPS}"]))
  saved = sorted(int(p.name) for p in (wd / "pretrain" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved == list(range(4, STEPS + 1, 4)), saved
  assert deterministic(metrics(wd)) == deterministic(
      [r for r in metrics(runs["two"]) if r["step"] % 4 == 0])


def test_a_signal_to_one_process_stops_both_at_one_saved_step(tmp_path, jax_cache):
  """SIGTERM to process 1 alone (a maintenance event on one host): both processes stop at
  the same step, saved (process 1 used to save alone while process 0 went on into the next
  step's collectives: a hang, and no checkpoint)."""
  wd = tmp_path / "signalled"
  args = [("--config.pretrain.steps=400" if a.startswith("--config.pretrain.steps") else a)
          for a in PRETRAIN_ARGS] + ["--config.train.save_every=1000"]
  procs = start_two(wd, jax_cache, args=args)
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and all(p.poll() is None for p, _ in procs) and not (
      (rows := rundir_rows(wd)) and rows[-1]["step"] >= 3):
    time.sleep(0.1)
  procs[1][0].send_signal(signal.SIGTERM)
  try:
    codes = [p.wait(timeout=120) for p, _ in procs]
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
  logs = [log.read_text() for _, log in procs]
  assert codes == [1, 1], (codes, logs[0][-2000:], logs[1][-2000:])
  stopped = [int(l.split(" at step ")[1].split(";")[0]) for l in logs[0].splitlines()
             if "checkpoint saved" in l]
  assert len(stopped) == 1 and "a signal to another process" in logs[0], logs[0][-2000:]
  assert (wd / "pretrain" / "checkpoints" / str(stopped[0])).is_dir()
  assert rundir_rows(wd)[-1]["step"] == stopped[0] < 400


def rundir_rows(workdir) -> list[dict]:
  from kstore_jax import rundir
  return rundir.read_metrics(str(pathlib.Path(workdir) / "pretrain" / "metrics.jsonl"))


# A grid of two copies of the reference run: `python -m kstore_jax.grid` with the run
# arguments (ARGS less --config) applied to both.
TWIN_GRID = """from configs import grids


def get_config(arg="tiny"):
  return grids.make({"a": grids.row_config("single", arg), "b": grids.row_config("single", arg)},
                    mode="vmap")
"""


@pytest.mark.parametrize("mesh, run_axis", [
    (SHARED_ROWS_MESH, "replicated"),
    (RUN_AXIS_DATA_MESH, "data")])
def test_processes_that_share_rows_match_one(runs, tmp_path, jax_cache, mesh, run_axis):
  """tensor=4 over 2 processes x 2 devices: the batch axes (data, fsdp) have one shard, so
  both processes' devices hold all 8 rows of every batch, and each must feed its devices all
  of them (its half alone made a 4-row global batch: loss 1e-3 off at step 1), LM and probe
  batches alike. Run as a two-run grid (the runs' batches stacked [R, B, L]: the grid's
  stacking shares rows as one run's batch does); the reference for both runs: the
  one-process run on the data=2 mesh.
  Also grid.run_axis=data on data=2 x tensor=2 (pretraining): each process's devices hold one
  whole run (its rows shared by the process's two devices), while each process's pipelines
  read its block of both runs' batches: the blocks are gathered into the runs the devices
  hold."""
  grid_file = tmp_path / "twins.py"
  grid_file.write_text(TWIN_GRID)
  wd = tmp_path / "shared"
  logs = finish(start_two(wd, jax_cache, n_devices=2, program="kstore_jax.grid",
                          args=[f"--config={grid_file}:tiny", *ARGS[1:], *mesh]))
  assert f"(run axis {run_axis})" in logs[0], logs[0][-2000:]
  # process 0 alone writes grid.json (both writing it raced on its temporary file: one
  # process failed with FileNotFoundError and the other hung in a collective)
  assert json.loads((wd / "grid.json").read_text())["runs"][1]["name"] == "b"
  for run in ("a", "b"):
    assert_close_losses(metrics(wd / run), metrics(runs["one"]))
    if run_axis == "replicated":   # (run_axis=data trains the LM alone: its probe batches
      assert_same_probes(wd / run, runs["one"], stages=("pprobe",))   # take the same path)


INTERLEAVED = """
import sys
import jax
import numpy as np
from jax.sharding import Mesh
from kstore_jax.tools import runtime
runtime.maybe_initialize_distributed()
from kstore_jax.train import sharding
mine = [d for d in jax.devices() if d.process_index == 0]
theirs = [d for d in jax.devices() if d.process_index == 1]
mesh = Mesh(np.array([d for pair in zip(mine, theirs) for d in pair]).reshape(4, 1, 1),
            sharding.AXES)
rows = np.arange(8 * 3).reshape(8, 3)   # the global batch; each process's pipeline block:
i = jax.process_index()
batch = sharding.to_global({"tokens": rows[4 * i:4 * i + 4]}, mesh)["tokens"]
for shard in batch.addressable_shards:
  assert np.array_equal(np.asarray(shard.data), rows[shard.index]), (shard.index, shard.data)
print("rows", sorted(int(shard.index[0].start) for shard in batch.addressable_shards))
"""


def test_a_mesh_that_interleaves_processes_gets_each_device_its_rows(tmp_path, jax_cache):
  """A TPU pod's 1-D data or fsdp axis follows the torus ring, so a host's devices hold rows
  apart from one another (a v4-32's 16-way data axis as jax lays it out): the
  batch was refused ("non-contiguous batch rows"). Here two processes' devices alternate on
  the data axis; each device gets exactly its rows of the global batch."""
  port, procs = free_port(), []
  for i in range(2):
    env = run_env(jax_cache, 2, KSTORE_NUM_PROCESSES="2", KSTORE_PROCESS_ID=str(i),
                  KSTORE_COORDINATOR=f"localhost:{port}")
    procs.append(subprocess.Popen([run_python(), "-c", INTERLEAVED], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=TIMEOUT) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert [[l for l in out.splitlines() if l.startswith("rows ")] for out, _ in outs] == [
      ["rows [0, 4]"], ["rows [2, 6]"]], outs
