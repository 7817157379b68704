"""Training end to end, run as a user would (`python -m kstore_jax.main` subprocesses):
loss falls, 1 vs 8 fake devices agree, kill -9 / SIGTERM resume bit-exactly, a checkpoint
written on 8 devices restores on 1 and 4, a damaged newest checkpoint is skipped, an error
restoring an intact one stops the run and keeps it, NaN stops the run, and every bioS row
config starts.

Compile time dominates, so the runs share one persistent JAX compilation cache (identical
programs compile to identical executables: it changes no number) and module-scoped fixtures.
"""

import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import runs
from runs import DETERMINISTIC, env as run_env, small_run_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "--config=configs/single.py:tiny"
STEPS, SAVE_EVERY = 40, 10
SMALL = small_run_args(STEPS, SAVE_EVERY)
MESH_2x2x2 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
# the 8-device reference run's gradient over 2 microbatches of 4 rows (batch 8), each spanning
# the 4 data-parallel shards: still the 1-device whole-batch run's losses
MICROBATCHES = ["--config.train.microbatch_rows=4"]


# -- helpers ------------------------------------------------------------------------------
def main_cmd(workdir, *extra, fresh=False) -> list[str]:
  return [runs.python(fresh), "-m", "kstore_jax.main", CONFIG, f"--workdir={workdir}", *SMALL,
          *extra]


def train(workdir, cache, *extra, n_devices=1, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(main_cmd(workdir, *extra), cwd=ROOT, env=run_env(cache, n_devices),
                        capture_output=True, text=True, timeout=timeout, check=False)


def start(workdir, cache, *extra, n_devices=1, fresh=False) -> subprocess.Popen:
  log = pathlib.Path(str(workdir) + ".log")   # files, not pipes: nobody reads them meanwhile
  return subprocess.Popen(main_cmd(workdir, *extra, fresh=fresh), cwd=ROOT, env=run_env(cache, n_devices),
                          stdout=open(log, "w"), stderr=subprocess.STDOUT)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r


def metrics(workdir, stage="pretrain") -> list[dict]:
  rows = []
  for line in (pathlib.Path(workdir) / stage / "metrics.jsonl").read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:   # a line being written right now
      pass
  return rows


def deterministic(rows) -> list[tuple]:
  return [tuple(r[k] for k in DETERMINISTIC) for r in rows]


def checkpoint_steps(workdir, stage="pretrain") -> list[int]:
  d = pathlib.Path(workdir) / stage / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def assert_close_losses(got, want, rtol=1e-5):
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    rel = abs(g["loss"] - w["loss"]) / abs(w["loss"])
    assert rel <= rtol, f"step {g['step']}: loss {g['loss']} vs {w['loss']} (rel {rel:.2e})"


def interrupt_mid_run(proc, workdir, sig, timeout=240) -> int:
  """Once a checkpoint exists and training is 2+ steps past it, send `sig`; wait for exit.
  Returns the newest checkpoint step seen when the signal was sent."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"the run ended (exit {proc.returncode}) before it could be interrupted; "
                  f"log: {pathlib.Path(str(workdir) + '.log').read_text()[-2000:]}")
    ckpts = checkpoint_steps(workdir)
    done = metrics(workdir) if (pathlib.Path(workdir) / "pretrain/metrics.jsonl").exists() else []
    if ckpts and done and done[-1]["step"] >= ckpts[-1] + 2:
      os.kill(proc.pid, sig)
      proc.wait(timeout=120)
      return ckpts[-1]
    time.sleep(0.01)
  proc.kill()
  pytest.fail("no checkpoint appeared in time")


def copy_tree(src, dst) -> None:
  subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def tree_digest(path) -> dict[str, str]:
  """{relative path: sha256 of a file's bytes, or 'dir'} of everything under `path`."""
  path = pathlib.Path(path)
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
          else "dir" for p in sorted(path.rglob("*"))}


# -- shared runs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, jax_cache):
  """Two uninterrupted runs, side by side (their compiles overlap on 2 cores): on 1 device
  (the reference for every resume test) and on 8 fake CPU devices with a 2x2x2 (data, fsdp,
  tensor) mesh and MICROBATCHES."""
  base = tmp_path_factory.mktemp("train")
  runs = {"baseline": start(base / "baseline", jax_cache),
          "mesh8": start(base / "mesh8", jax_cache, *MESH_2x2x2, *MICROBATCHES, n_devices=8)}
  for name, proc in runs.items():
    rc = proc.wait(timeout=600)
    assert rc == 0, f"{name}: exit {rc}\n{(base / (name + '.log')).read_text()[-3000:]}"
  return {name: (base / name, metrics(base / name)) for name in runs}


@pytest.fixture(scope="module")
def baseline(reference_runs):
  return reference_runs["baseline"]


@pytest.fixture(scope="module")
def mesh8(reference_runs):
  return reference_runs["mesh8"]


# -- tests --------------------------------------------------------------------------------
def test_pretrain_loss_falls_and_files(baseline, jax_cache):
  wd, rows = baseline
  assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
  assert rows[0]["loss"] > rows[-1]["loss"] + 0.5, (rows[0]["loss"], rows[-1]["loss"])
  for key in ("step", "loss", "lr", "grad_norm"):
    assert key in rows[0]
  # rates are of trained steps: from the second row on (the first step's compile untimed)
  assert "tokens_per_s" not in rows[0] and all("tokens_per_s" in row for row in rows[1:])
  # the stage's "done" line says where its wall time went: setup, the compiled first step,
  # the saves (at least one: SAVE_EVERY < STEPS)
  done = re.search(r"\[pretrain\] done: (\d+) steps in \S+ \(([\d.]+) s before the first "
                   r"step, ([\d.]+) s in it with its compile, ([\d.]+) s in saves and evals\)",
                   pathlib.Path(str(wd) + ".log").read_text())
  assert done and int(done[1]) == STEPS, "no done line with its timings in the log"
  # (each may print as 0.0: a first step loaded from the compilation cache takes ~0.05 s)
  assert all(float(x) >= 0 for x in done.groups()[1:])
  first = re.search(r"\[pretrain\] step 1: ([\d.]+) s with its compile, ([\d.]+) s before it",
                    pathlib.Path(str(wd) + ".log").read_text())
  assert first and first.groups() == done.groups()[2:0:-1], "no first-step line, or another"
  assert (wd / "config.json").is_file() and (wd / "tokenizer.json").is_file()
  assert json.loads((wd / "config.json").read_text())["pretrain"]["steps"] == STEPS
  assert (wd / "pretrain/final").is_dir()
  assert checkpoint_steps(wd) == [STEPS - SAVE_EVERY, STEPS]   # keep_checkpoints=2
  assert not (wd / "results.json").exists()   # only the pretrain stage ran
  # A finished stage is skipped on rerun.
  again = ok(train(wd, jax_cache))
  assert "already done" in again.stdout
  assert metrics(wd) == rows


def test_8_devices_match_1_device(baseline, mesh8):
  _, rows1 = baseline
  _, rows8 = mesh8
  assert_close_losses(rows8, rows1)
  assert [r["loss_tokens"] for r in rows8] == [r["loss_tokens"] for r in rows1]


def test_kill_9_resumes_bit_exactly(baseline, tmp_path, jax_cache):
  wd = tmp_path / "killed"
  newest = interrupt_mid_run(start(wd, jax_cache, fresh=True), wd, signal.SIGKILL)
  assert newest < STEPS and not (wd / "pretrain/final").exists()
  r = ok(train(wd, jax_cache))
  assert f"resumed from step {newest}" in r.stdout, r.stdout
  assert deterministic(metrics(wd)) == deterministic(baseline[1])
  assert (wd / "pretrain/final").is_dir()


def test_sigterm_saves_and_resumes(baseline, tmp_path, jax_cache):
  wd = tmp_path / "terminated"
  proc = start(wd, jax_cache)
  interrupt_mid_run(proc, wd, signal.SIGTERM)
  log = pathlib.Path(str(wd) + ".log").read_text()
  assert proc.returncode > 0, (proc.returncode, log[-2000:])   # an error exit, not the signal
  stopped = metrics(wd)[-1]["step"]
  assert f"SIGTERM at step {stopped}" in log, log[-2000:]
  assert checkpoint_steps(wd)[-1] == stopped < STEPS
  assert not (wd / "pretrain/final").exists()
  r = ok(train(wd, jax_cache))
  assert f"resumed from step {stopped}" in r.stdout, r.stdout
  assert deterministic(metrics(wd)) == deterministic(baseline[1])


@pytest.mark.parametrize("n_devices, mesh", [
    (1, []),   # the default mesh: data=-1
    (4, ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]),
])
def test_checkpoint_from_8_devices_restores_elsewhere(mesh8, tmp_path, jax_cache, n_devices,
                                                      mesh):
  src, rows8 = mesh8
  wd = tmp_path / f"elastic{n_devices}"
  copy_tree(src, wd)   # an 8-device run stopped after its step-30 checkpoint:
  resume = STEPS - SAVE_EVERY
  subprocess.run(["rm", "-rf", str(wd / "pretrain/final"),
                  str(wd / f"pretrain/checkpoints/{STEPS}")], check=True)
  assert checkpoint_steps(wd) == [resume]
  r = ok(train(wd, jax_cache, *mesh, n_devices=n_devices))
  assert f"resumed from step {resume}" in r.stdout, r.stdout
  rows = metrics(wd)
  assert rows[:resume] == rows8[:resume]
  assert_close_losses(rows, rows8)
  assert (wd / "pretrain/final").is_dir()


def test_damaged_newest_checkpoint_falls_back(baseline, tmp_path, jax_cache):
  src, rows1 = baseline
  wd = tmp_path / "damaged"
  copy_tree(src, wd)
  subprocess.run(["rm", "-rf", str(wd / "pretrain/final")], check=True)
  state = wd / f"pretrain/checkpoints/{STEPS}/state"
  largest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)
  cut = f"{largest.relative_to(state.parent)} has {largest.stat().st_size} bytes"
  r = ok(train(wd, jax_cache))
  older = STEPS - SAVE_EVERY
  assert f"resumed from step {older}" in r.stdout, r.stdout
  assert f"checkpoint step {STEPS}" in r.stderr and "unreadable" in r.stderr, r.stderr[-2000:]
  assert cut in r.stderr, r.stderr[-2000:]   # told from the step's manifest
  assert deterministic(metrics(wd)) == deterministic(rows1)
  assert (wd / "pretrain/final").is_dir()
  assert checkpoint_steps(wd) == [older, STEPS]   # step 40 saved again
  assert (wd / f"pretrain/checkpoints/{STEPS}.unreadable").is_dir()   # the damaged one, aside


# `python -m kstore_jax.main ARGS` with every orbax CheckpointManager.restore failing.
FAILING_RESTORE = r"""
import runpy, sys
import kstore_jax   # first: it sets the allocator up before JAX starts (heap.py)
import orbax.checkpoint as ocp

def failing_restore(self, step, *args, **kwargs):
  raise OSError(5, f"Input/output error (injected at step {step})")

ocp.CheckpointManager.restore = failing_restore
sys.argv = ["kstore_jax.main", *sys.argv[1:]]
runpy.run_module("kstore_jax.main", run_name="__main__", alter_sys=True)
"""


def test_restore_error_stops_keeps_checkpoints_and_rerun_resumes(baseline, tmp_path,
                                                                  jax_cache):
  """An error restoring an intact step (an I/O error here; out of memory or a code change
  alike) is not damage: one error line naming the step and the cause, a non-zero exit, not a
  byte of the stage changed (no step set aside, metrics.jsonl not truncated); the next run
  resumes from that step on exactly the next batch."""
  src, rows1 = baseline
  wd = tmp_path / "restore_error"
  copy_tree(src, wd)   # a run stopped after its step-30 checkpoint
  resume = STEPS - SAVE_EVERY
  subprocess.run(["rm", "-rf", str(wd / "pretrain/final"),
                  str(wd / f"pretrain/checkpoints/{STEPS}")], check=True)
  assert checkpoint_steps(wd) == [resume]
  before = tree_digest(wd / "pretrain")
  r = subprocess.run([sys.executable, "-c", FAILING_RESTORE, *main_cmd(wd)[3:]], cwd=ROOT,
                     env=run_env(jax_cache), capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
  errors = [l for l in r.stderr.splitlines() if l.startswith("kstore_jax.main: error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  assert f"checkpoint step {resume} " in errors[0], errors[0]
  assert "OSError: [Errno 5] Input/output error (injected" in errors[0], errors[0]
  assert "resumed" not in r.stdout and "step 1/" not in r.stdout, r.stdout[-2000:]
  assert tree_digest(wd / "pretrain") == before
  r = ok(train(wd, jax_cache))
  assert f"resumed from step {resume}" in r.stdout, r.stdout
  assert deterministic(metrics(wd)) == deterministic(rows1)
  assert (wd / "pretrain/final").is_dir()


def test_nan_stops_the_run_and_keeps_last_good_checkpoint(tmp_path, jax_cache):
  # lr=1e30: the first non-zero-lr update (step 2) blows the weights up; the loss at step 3
  # is NaN. save_every=1 so that good checkpoints exist before the failure.
  wd = tmp_path / "nan"
  r = train(wd, jax_cache, "--config.pretrain.lr=1e30", "--config.train.save_every=1")
  assert r.returncode != 0
  msg = [l for l in r.stderr.splitlines() if "non-finite" in l]
  assert len(msg) == 1, r.stderr[-3000:]
  failing = int(msg[0].split("at step ")[1].split()[0])
  assert 1 < failing < STEPS
  assert not (wd / "pretrain/final").exists()
  ckpts = checkpoint_steps(wd)
  assert ckpts and ckpts[-1] < failing
  assert all(r_["step"] < failing for r_ in metrics(wd))   # the bad step is not logged


ROWS_SCRIPT = r"""
import glob, json, os, sys
import jax
from kstore_jax import configlib, experiment, rundir
from kstore_jax.data import tokenizer as tokenizer_lib

out, tok = sys.argv[1], None
for path in sorted(glob.glob("configs/*.py")):
  name = os.path.basename(path)[:-3]
  if name in ("base", "tiny", "__init__"):
    continue
  cfg = configlib.load_config_file(path + ":tiny")
  cfg.data.update(n_people=50, vocab_size=1024, seq_len=256)
  cfg.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64)
  cfg.pretrain.update(steps=2, batch_size=2, warmup_steps=1)
  cfg.train.update(log_every=1, save_every=2)
  cfg.stages = ("pretrain",)
  configlib.validate(cfg, jax.device_count())
  tok = tok or tokenizer_lib.get_tokenizer(cfg.data)
  wd = os.path.join(out, name)
  exp = experiment.Experiment(cfg, tok, experiment.Workdir(wd))
  exp.run()
  rows = rundir.read_metrics(os.path.join(wd, "pretrain", "metrics.jsonl"))
  print(json.dumps({"row": name, "name": cfg.name, "multi": cfg.data.multi,
                    "permute": cfg.data.permute, "fullname": cfg.data.fullname,
                    "bios": sum(len(exp.world.group_bios(g)) for g in exp.world.groups),
                    "steps": [r["step"] for r in rows],
                    "loss": rows[-1]["loss"],
                    "final": os.path.isdir(os.path.join(wd, "pretrain", "final"))}), flush=True)
"""


def test_every_row_config_starts(tmp_path, jax_cache):
  r = subprocess.run([sys.executable, "-c", ROWS_SCRIPT, str(tmp_path)], cwd=ROOT,
                     env=run_env(jax_cache), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = {d["row"]: d for d in map(json.loads, (l for l in r.stdout.splitlines()
                                                  if l.startswith("{")))}
  expected = {p.stem for p in (ROOT / "configs").glob("*.py")} - {"base", "tiny", "__init__"}
  assert len(expected - {"celeb_minority", "minority_only"}) == 16 and set(rows) == expected
  for name, d in rows.items():
    assert d["name"] == name and d["steps"] == [1, 2] and d["final"], d
    assert 0 < d["loss"] < 100, d
    assert d["fullname"] == name.endswith("_fullname"), d
    assert d["permute"] == ("permute" in name), d
  # The augmentations differ: multi=M gives M bios per person.
  assert rows["multi5"]["bios"] == 5 * rows["multi2"]["bios"] // 2 == 5 * 50
