"""Grid mode (`python -m kstore_jax.grid`), run as a user would: a vmapped grid's runs train as
they would alone (1e-5 relative, on 1 and on 8 fake devices), each run's directory is main's,
kill -9 then rerun gives every run the uninterrupted grid's metrics bit for bit, a bad grid is
one line with nothing written, and a toy Figure-3 grid of 32 runs reports every row in both
columns.
"""

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
from runs import DETERMINISTIC, ROOT, micro_stage_args, small_run_args

STEPS, SAVE_EVERY = 20, 10
# two layers: a slower step keeps the kill-9 test's window (steps 12-20) wide
ARGS = small_run_args(STEPS, SAVE_EVERY, layers=2)
ROWS = ("single", "single_permute1", "multi5", "multi5_permute")
SOLO = ("single", "multi5_permute")   # the runs also trained alone by main
GRID_FILE = f'''from configs import grids


def get_config(arg="tiny"):
  return grids.make({{r: grids.row_config(r, arg) for r in {ROWS!r}}})
'''


@pytest.fixture(scope="module")
def env(jax_cache):
  """n_devices -> the environment of a grid subprocess (runs.env)."""
  return lambda n_devices=1: runs.env(jax_cache, n_devices)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
  path = tmp_path_factory.mktemp("grids") / "four.py"
  path.write_text(GRID_FILE)
  return path


def grid_cmd(config, workdir, *extra, mode="vmap", fresh=False) -> list[str]:
  return [runs.python(fresh), "-m", "kstore_jax.grid", f"--config={config}:tiny",
          f"--workdir={workdir}", f"--config.grid.mode={mode}", *ARGS, *extra]


def run(cmd, env, timeout=400) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def ok(r):
  assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r


def metrics(stage_dir) -> list[dict]:
  path = pathlib.Path(stage_dir) / "metrics.jsonl"
  rows = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      rows.append(json.loads(line))
    except ValueError:   # a line being written right now
      pass
  return rows


def assert_close(got, want, rtol=1e-5):
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
  for g, w in zip(got, want):
    rel = abs(g["loss"] - w["loss"]) / abs(w["loss"])
    assert rel <= rtol, f"step {g['step']}: loss {g['loss']} vs {w['loss']} (rel {rel:.2e})"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, four, env):
  """(grid directory, {row: solo workdir}): the 4-run grid, and two of its rows run by main."""
  base = tmp_path_factory.mktemp("trained")
  grid = base / "grid"
  # with a profiler trace of steps 2-3 (train.profile_steps; it changes no number)
  r = ok(run(grid_cmd(four, grid, "--config.train.profile_steps=2,4"), env()))
  assert "4 run(s) in one step" in r.stdout, r.stdout[-2000:]
  solo = {}
  for row in SOLO:
    solo[row] = base / f"solo_{row}"
    ok(run([runs.python(), "-m", "kstore_jax.main", f"--config=configs/{row}.py:tiny",
            f"--workdir={solo[row]}", *ARGS], env()))
  return grid, solo


def test_grid_runs_equal_solo_runs(trained):
  grid, solo = trained
  # ARGS train pretraining only: no QA training (grid.json said 'finetune', and the report
  # listed unstarted runs in the finetune column)
  assert json.loads((grid / "grid.json").read_text())["runs"][0] == {
      "name": "single", "row": "single", "method": "no QA training"}
  for row in ROWS:
    d = grid / row
    for f in ("config.json", "tokenizer.json", "pretrain/final", "pretrain/checkpoints/20"):
      assert (d / f).exists(), (row, f)
  # the cohort's trace lands in its first run's stage directory
  assert list((grid / "single/pretrain/profile").rglob("*.xplane.pb")), "no profiler trace"
  for row, wd in solo.items():
    got = json.loads((grid / row / "config.json").read_text())
    assert got["train"].pop("profile_steps") == "2,4"
    want = json.loads((wd / "config.json").read_text())
    want["train"].pop("profile_steps")
    assert got == want
    assert_close(metrics(grid / row / "pretrain"), metrics(wd / "pretrain"))
  # the rows differ in data: their losses are not the same numbers
  assert metrics(grid / "single/pretrain")[-1]["loss"] != metrics(
      grid / "multi5_permute/pretrain")[-1]["loss"]
  # a run's FLOP/s is its share of the step; the cohort's is the 4 runs' work (a run's
  # 'mfu' alone read as a quarter of what the device did)
  timed = [row for row in metrics(grid / "single/pretrain") if "flops_per_s" in row]
  assert len(timed) == STEPS - 1   # (the first step's compile untimed)
  for row in timed:
    assert row["cohort_runs"] == 4
    assert row["cohort_flops_per_s"] == pytest.approx(4 * row["flops_per_s"], rel=1e-9), row


@pytest.mark.parametrize("mesh, run_axis", [
    # the default: the run axis replicated, each run's rows split over data's 8 devices
    ([], "replicated"),
    # run_axis=data, and data = 2 divides them: one run per data slice, its rows split over
    # fsdp's 4 devices
    (["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.grid.run_axis=data"], "data")])
def test_grid_on_8_devices_equals_solo(trained, four, env, tmp_path, mesh, run_axis):
  _, solo = trained
  wd = tmp_path / "grid8"
  r = ok(run(grid_cmd(four, wd, f"--runs={','.join(SOLO)}", *mesh), env(8)))
  assert f"(run axis {run_axis})" in r.stdout, r.stdout[-2000:]
  assert not (wd / "single_permute1").exists()
  for row, solo_wd in solo.items():
    assert_close(metrics(wd / row / "pretrain"), metrics(solo_wd / "pretrain"))


def test_processes_mode_equals_solo(trained, four, env, tmp_path):
  """Each run in its own process pinned to one core (the CPU default): main's numbers."""
  _, solo = trained
  wd = tmp_path / "procs"
  r = ok(run(grid_cmd(four, wd, f"--runs={','.join(SOLO)}", mode="processes"), env()))
  assert "mode processes" in r.stdout, r.stdout[-2000:]
  # grid.json lists every run of the grid, also when --runs trains some (the report shows
  # the others as not run); the parent and its two children all wrote it, whole
  assert [r["name"] for r in json.loads((wd / "grid.json").read_text())["runs"]] == list(ROWS)
  assert not list(wd.glob("*.tmp"))
  for row, solo_wd in solo.items():
    assert f"[{row}] [pretrain] step {STEPS}/{STEPS}" in r.stdout, r.stdout[-2000:]
    assert_close(metrics(wd / row / "pretrain"), metrics(solo_wd / "pretrain"))


def test_main_takes_over_a_grid_run(trained, env):
  grid, _ = trained
  r = ok(run([runs.python(), "-m", "kstore_jax.main", "--config=configs/multi5.py:tiny",
              f"--workdir={grid / 'multi5'}", *ARGS], env()))
  assert "[pretrain] already done" in r.stdout, r.stdout


def test_kill_9_then_rerun_matches_uninterrupted_grid(trained, four, env, tmp_path):
  grid, _ = trained
  wd = tmp_path / "killed"
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(grid_cmd(four, wd, fresh=True), cwd=ROOT, env=env(), stdout=log,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = metrics(wd / ROWS[-1] / "pretrain")
    if (wd / ROWS[0] / "pretrain/checkpoints" / str(SAVE_EVERY)).exists() and done and (
        done[-1]["step"] >= SAVE_EVERY + 2):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
  r = ok(run(grid_cmd(four, wd), env()))
  assert "resumed from step" in r.stdout, r.stdout[-2000:]
  for row in ROWS:
    got, want = metrics(wd / row / "pretrain"), metrics(grid / row / "pretrain")
    assert [tuple(x[k] for k in DETERMINISTIC) for x in got] == [
        tuple(x[k] for k in DETERMINISTIC) for x in want], row


@pytest.mark.parametrize("extra, message", [
    (["--config.model.bogus=1"], "--config.model.bogus: unknown config key"),
    (["--config.grid.mode=fast"], "'grid.mode'='fast' must be one of"),
    (["--config.grid.run_axis=tensor"], "'grid.run_axis'='tensor' must be one of"),
    (["--config.grid.eval_runs=sometimes"], "'grid.eval_runs'='sometimes' must be one of"),
    (["--config.grid.precompile=maybe"], "'grid.precompile'='maybe' must be one of"),
    (["--config.data.qa_ratio=2.0"], "run 'single': data.qa_ratio=2.0"),
    (["--runs=single,nobody"], "--runs: 'nobody' is not a run of the grid"),
    (["--runs="], "--runs= names no run"),
    (["--config.eval.batch_size=0"], "run 'single': eval.batch_size=0 must be >= 1"),
    (["--config.train.memory_gb=-1"], "run 'single': train.memory_gb=-1.0 must be >= 0"),
])
def test_bad_grid_is_one_line_and_writes_nothing(four, env, tmp_path, extra, message):
  wd = tmp_path / "bad"
  r = run(grid_cmd(four, wd, *extra), env(), timeout=120)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], r.stderr
  assert not wd.exists()


@pytest.mark.parametrize("mode", ["vmap", "processes"])
def test_a_grid_on_a_running_one_changes_nothing(four, env, tmp_path, mode):
  """A second grid command on a directory whose run another grid holds stops on that run's
  lock in one line, and leaves the running grid's grid.json as it was (the report reads its
  runs and methods there): the runs are locked before grid.json is written."""
  from kstore_jax import rundir
  wd = tmp_path / "held"
  wd.mkdir()
  (wd / "grid.json").write_text("the running grid's")
  held = rundir.lock(str(wd / ROWS[2]), 0)
  try:
    r = run(grid_cmd(four, wd, "--config.eval.max_people=7", mode=mode), env(), timeout=120)
  finally:
    held.close()
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert lines[0].endswith(f"--workdir={wd / ROWS[2]}: locked by another running experiment")
  assert (wd / "grid.json").read_text() == "the running grid's"


def test_grid_overrides_read_as_main_reads_them(tmp_path):
  """A tuple literal is a tuple (main's ml_collections reads it so; the grid took
  `('pretrain'` for a stage), and a key only some runs have names the run that lacks it."""
  from configs import base
  from kstore_jax import configlib
  g = configlib.load_grid("configs/grids/demo.py:tiny", ["stages=('pretrain', 'eval')"])
  assert {base.stage_list(r) for r in g.runs.values()} == {("pretrain", "eval")}
  grouped = tmp_path / "grouped.py"
  grouped.write_text("from configs import celeb_minority, grids\n\n\ndef get_config(arg='tiny'):"
                     "\n  return grids.make({'cm': celeb_minority.get_config(arg), "
                     "'single': grids.row_config('single', arg)})\n")
  with pytest.raises(configlib.ConfigError, match=r"^run 'single': --config.data.groups.star"):
    configlib.load_grid(f"{grouped}:tiny", ["data.groups.star.tokens=0.4"])


def test_a_grid_child_ends_with_its_parent(tmp_path):
  """A processes-mode child asks for SIGTERM when its parent dies (kill -9 included), so it
  saves and frees its workdir for the rerun; before, it trained on holding the lock and the
  rerun failed with 'locked by another running experiment'."""
  pid_file = tmp_path / "child.pid"
  child = ("import os, time; from kstore_jax.tools import runtime; runtime.die_with_parent(); "
           f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
  parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             f"subprocess.Popen([sys.executable, '-c', {child!r}]); "
                             "time.sleep(120)"], cwd=ROOT)
  deadline = time.time() + 60
  while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
    time.sleep(0.1)
  pid = int(pid_file.read_text())
  parent.kill()
  parent.wait()
  deadline = time.time() + 10
  while time.time() < deadline and os.path.exists(f"/proc/{pid}") and \
      "zombie" not in open(f"/proc/{pid}/status").read():
    time.sleep(0.1)
  alive = os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read()
  if alive:
    os.kill(pid, signal.SIGKILL)
  assert not alive, "the child outlived its parent"


@pytest.mark.parametrize("mode", ["sequential", "vmap"])
def test_a_grid_goes_on_past_a_run_that_diverges(env, tmp_path, mode):
  """A run whose loss goes NaN stops alone: the other run trains (after it, or in its
  cohort), the grid exits 1 naming the run that diverged (it stopped every other run
  before). The run that diverges is a mixed one: in vmap mode its pretrain_mixed trains in the
  step group of the other's pretrain (its own cohort: another lr), not the group's first stage."""
  grid = tmp_path / "blowup.py"
  grid.write_text("from configs import grids\n\n\ndef get_config(arg='tiny'):\n"
                  "  blowup = grids.row_config('single', arg + ',mixed')\n"
                  "  blowup.pretrain_mixed.lr = 1e30\n  blowup.stages = ('pretrain_mixed',)\n"
                  "  fine = grids.row_config('single', arg)\n  fine.stages = ('pretrain',)\n"
                  "  return grids.make({'blowup': blowup, 'fine': fine})\n")
  wd = tmp_path / "runs"
  # lr=None: a command-line lr would override blowup's 1e30
  args = small_run_args(6, 3, lr=None)
  args += [a.replace("pretrain.", "pretrain_mixed.") for a in args if "pretrain." in a]
  r = run([runs.python(), "-m", "kstore_jax.grid", f"--config={grid}:tiny", f"--workdir={wd}",
           f"--config.grid.mode={mode}",
           *[a for a in args if not a.startswith("--config.stages=")]], env())
  assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
  label = "pretrain_mixed" if mode == "sequential" else "blowup/pretrain_mixed"
  assert [l for l in r.stderr.splitlines() if "non-finite" in l][0].startswith(
      f"kstore_jax.grid: [{label}] non-finite"), r.stderr[-2000:]
  if mode == "vmap":
    assert r.stderr.strip().splitlines()[-1].startswith(
        "kstore_jax.grid: run(s) blowup stopped on a non-finite loss"), r.stderr[-2000:]
  assert not (wd / "blowup/pretrain_mixed/final").exists()
  assert (wd / "fine/pretrain/final").exists(), r.stdout[-2000:]


def test_a_workdir_that_is_a_file_is_one_line(four, env, tmp_path):
  for tool in ("grid", "main"):
    wd = tmp_path / f"{tool}_file"
    wd.write_text("not a directory")
    cmd = (grid_cmd(four, wd) if tool == "grid" else
           [runs.python(), "-m", "kstore_jax.main", "--config=configs/single.py:tiny",
            f"--workdir={wd}", *ARGS])
    r = run(cmd, env(), timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "not a directory" in lines[0], r.stderr
    assert wd.read_text() == "not a directory"


def test_fig3_toy_grid_reports_every_row_in_both_columns(env, tmp_path):
  wd = tmp_path / "fig3"
  micro = ["--config.data.n_people=60", "--config.data.vocab_size=1024",
           "--config.data.seq_len=192", "--config.model.num_layers=1",
           "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.d_ff=64",
           "--config.eval.max_people=8", "--config.train.log_every=1",
           "--config.grid.max_runs=16", "--config.grid.eval_runs=together",
           *(f"--config.{s}.{k}={v}" for s in ("pretrain", "pretrain_mixed", "finetune")
             for k, v in (("steps", 2), ("batch_size", 4), ("warmup_steps", 1), ("lr", 5e-3)))]
  r = ok(run([runs.python(), "-m", "kstore_jax.grid", "--config=configs/grids/fig3.py:tiny",
              f"--workdir={wd}", "--config.grid.mode=vmap", *micro], env(), timeout=600))
  # pretrain and pretrain_mixed at equal settings share cohorts: 32 base runs in 2 steps of
  # 16, then the 16 finetunes
  assert r.stdout.count("pretrain, pretrain_mixed: 16 run(s) in one step") == 2, r.stdout[-3000:]
  assert r.stdout.count("finetune: 16 run(s) in one step") == 1, r.stdout[-3000:]
  # a mixed run trained in such a cohort is the run trained alone (its pretrain_mixed stage:
  # the eval after it changes nothing of it)
  solo = tmp_path / "solo"
  ok(run([runs.python(), "-m", "kstore_jax.main", "--config=configs/multi5_permute.py:tiny,mixed",
          f"--workdir={solo}", *[m for m in micro if not m.startswith("--config.grid.")],
          "--config.stages=pretrain_mixed"], env()))
  got, want = (metrics(d / "pretrain_mixed") for d in (wd / "multi5_permute_mixed", solo))
  assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
  for g, w in zip(got, want):
    assert abs(g["loss"] - w["loss"]) <= 1e-5 * abs(w["loss"]), (g, w)
  # every run asks the same questions of the same model: 2 x 16 evals decoded together
  assert r.stdout.count("eval: 16 run(s) decoded together") == 2, r.stdout[-3000:]
  sys.path.insert(0, str(ROOT))
  from configs import grids
  out = tmp_path / "report.md"
  r = ok(run([runs.python(), "-m", "kstore_jax.report", str(wd), f"--out={out}"], env()))
  table = out.read_text().split("\n\n")[2].splitlines()[2:]   # the headline table's rows
  # FIG3_ROWS is the paper's order: the report keeps it
  assert [row.split("|")[1].strip() for row in table] == [f"`{n}`" for n in grids.FIG3_ROWS]
  for row in table:   # a number with its interval in both columns, e.g. "0.0 [0.0, 12.3]"
    cells = row.split("|")[2:4]
    assert all("[" in c for c in cells), row



def test_precompile_compiles_the_next_stage_while_one_trains(env, tmp_path):
  """grid.precompile=on: the finetune cohort's step (another batch shape than pretraining's,
  so another program) is compiled while the pretrain cohort trains, and the finetune stage
  starts on that executable: no step is compiled after the line that says it waited for it
  (with `off` there is no such line and the step compiles when its stage starts). Both
  threads' compiles are in the log in order (stdout and stderr in one pipe)."""
  cmd = [runs.python(), "-m", "kstore_jax.grid", "--config=configs/grids/small5.py:tiny",
         f"--workdir={tmp_path / 'ahead'}", "--config.grid.mode=vmap",
         "--config.grid.precompile=on", "--runs=single_finetune,multi5_finetune",
         "--config.data.n_people=100", "--config.data.vocab_size=1024",
         "--config.data.seq_len=160", "--config.eval.max_people=8",
         *micro_stage_args(4, 10, pretrain=4),
         "--config.finetune.steps=2", "--config.finetune.batch_size=8"]
  r = subprocess.run(cmd, cwd=ROOT, env={**env(), "JAX_LOG_COMPILES": "1"},
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400,
                     check=False)
  assert r.returncode == 0, r.stdout[-3000:]
  lines = r.stdout.splitlines()
  ahead = [i for i, l in enumerate(lines) if re.fullmatch(
      r"\[grid\] finetune: compiled ahead \(\d+\.\d s waited\)", l)]
  compiles = [i for i, l in enumerate(lines) if "Compiling jit(step)" in l]
  assert len(ahead) == 1 and len(compiles) >= 2, "\n".join(lines[-60:])
  assert max(compiles) < ahead[0] < next(
      i for i, l in enumerate(lines) if "[grid] finetune: 2 run(s) in one step" in l)
  assert metrics(tmp_path / "ahead" / "single_finetune" / "finetune")[-1]["step"] == 2


def test_a_run_behind_catches_up_in_the_whole_cohort(trained, four, env, tmp_path):
  """One run resumes at step 10, the others at 20 (a kill between their saves): it catches
  up in steps of the whole 4-run cohort, so its numbers are the uninterrupted grid's."""
  grid, _ = trained
  wd = tmp_path / "behind"
  subprocess.run(["cp", "-a", str(grid), str(wd)], check=True)
  for row in ROWS:
    subprocess.run(["rm", "-rf", str(wd / row / "pretrain/final")], check=True)
  subprocess.run(["rm", "-rf", str(wd / "multi5/pretrain/checkpoints/20")], check=True)
  r = ok(run(grid_cmd(four, wd), env()))
  assert "[multi5/pretrain] resumed from step 10" in r.stdout, r.stdout[-2000:]
  assert "[single/pretrain] resumed from step 20" in r.stdout, r.stdout[-2000:]
  for row in ROWS:
    got, want = metrics(wd / row / "pretrain"), metrics(grid / row / "pretrain")
    assert [tuple(x[k] for k in DETERMINISTIC) for x in got] == [
        tuple(x[k] for k in DETERMINISTIC) for x in want], row
    assert (wd / row / "pretrain/final").is_dir()


def test_cohorts_fit_the_memory_a_device_may_use(trained, four, env, tmp_path):
  """A step that needs more memory a device than train.memory_gb (or the device) allows is
  refused in one line before it trains, nothing saved; with room for one run's step but not
  two (the refusal's own count of one run's need, x 1.5: the cohort fit allows 90% of the
  budget), the grid trains its runs one a step, each with main's numbers."""
  _, solo = trained
  wd = tmp_path / "fit"
  pick = f"--runs={','.join(SOLO)}"
  r = run(grid_cmd(four, wd, pick, "--config.train.memory_gb=0.000001"), env())
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "the pretrain step needs " in lines[0], r.stderr
  assert "more than the 1e-06 GB of train.memory_gb=1e-06: set train.microbatch_rows" in lines[0]
  assert not list(wd.rglob("checkpoints/*")) and not list(wd.rglob("final"))
  need = float(re.search(r"needs ([0-9.e+-]+) GB", lines[0]).group(1))
  r = ok(run(grid_cmd(four, wd, pick, f"--config.train.memory_gb={need * 1.5:.6g}"), env()))
  assert re.search(r"\(2 runs: [0-9.e+-]+ GB, 1 run: [0-9.e+-]+ GB\) against .*: 1 run\(s\) a "
                   r"step", r.stdout), r.stdout[-2000:]
  assert "2 run(s) in one step" not in r.stdout
  for row, solo_wd in solo.items():
    assert f"1 run(s) in one step (run axis replicated): {row}" in r.stdout
    assert_close(metrics(wd / row / "pretrain"), metrics(solo_wd / "pretrain"))


def test_processes_mode_children_wait_for_each_other_before_timing(tmp_path):
  """`bench grid`'s processes-mode children time their steps together: a child warmed up says
  so and waits for the parent's `go` (its steps were timed while the other still compiled)."""
  import threading
  from kstore_jax.train import throughput
  waiter = threading.Thread(target=throughput.barrier_wait, args=(str(tmp_path),))
  waiter.start()
  deadline = time.time() + 10
  while not list(tmp_path.glob("ready.*")) and time.time() < deadline:
    time.sleep(0.01)
  assert [p.name for p in tmp_path.glob("ready.*")] == [f"ready.{os.getpid()}"]
  time.sleep(0.1)
  assert waiter.is_alive()   # no `go` yet
  (tmp_path / throughput.BARRIER_GO).touch()
  waiter.join(timeout=10)
  assert not waiter.is_alive()


def test_bench_grid_times_both_modes(four, env):
  r = ok(run([runs.python(), "-m", "kstore_jax.bench", "grid", f"--config={four}:tiny",
              "--runs=2", "--train_steps=1", "--grid_eval_people=4", *ARGS], env()))
  lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  rows = [row for row in lines if row["name"] == "grid_speedup"]
  assert {row["mode"] for row in rows} == {"vmap", "processes"}
  for row in rows:
    if row.get("skipped"):   # processes, one core: said, not left out silently
      assert row["mode"] == "processes" and len(os.sched_getaffinity(0)) == 1, row
      continue
    assert row["runs"] == 2 and row["value"] > 0
    assert abs(row["value"] - row["alone_step_s"] / row["grid_step_s"]) < 0.01
    # the same FLOPs either way: the rates' ratio is the speedup (no MFU: no CPU peak)
    assert row["grid_tflops_per_s"] / row["alone_tflops_per_s"] == pytest.approx(
        row["alone_step_s"] / row["grid_step_s"], rel=0.01)
    assert row["alone_tflops_per_s"] > 0 and "grid_mfu" not in row
  (ev,) = [row for row in lines if row["name"] == "grid_eval_speedup"]   # vmap's eval
  assert ev["runs"] == 2 and ev["questions"] == 2 * 4 * 6, ev
  assert ev["value"] == pytest.approx(ev["alone_s"] / ev["together_s"], rel=0.02)
  assert len(lines) == len(rows) + 1


TAKE_RUN_CHECK = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from kstore_jax.train import loop
mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
rng = np.random.default_rng(0)
w = rng.standard_normal((8, 256, 64)).astype(np.float32)
w[3, 0, 0], w[3, 0, 1] = -0.0, np.nan          # kept bit for bit
leaves = {"w": (w, P("data", None, "tensor")),
          "b": (rng.standard_normal((8, 64)).astype(jnp.bfloat16), P("data", "tensor")),
          "n": (np.arange(8, dtype=np.int32) * 7, P("data")),
          "f": (np.arange(8) % 2 == 1, P("data"))}
tree = {k: jax.device_put(v, NamedSharding(mesh, s)) for k, (v, s) in leaves.items()}
hlo = loop._take_run.lower(tree, 3, True).compile().as_text()
gathers = [l for l in hlo.splitlines() if re.search(r"= \S+ all-gather\(", l)]
reduced = sum(int(np.prod([int(d) for d in re.findall(r"\d+", dims)] or [1]))
              for l in hlo.splitlines() if re.search(r"all-reduce(-start)?\(", l)
              for dims in re.findall(r"u32\[([\d,]*)\]", l.split("=")[1].split("all-reduce")[0]))
out = loop._take_run(tree, 3, True)
print(json.dumps({
    "gathers": len(gathers), "reduced": reduced,
    "bits": {k: np.atleast_1d(np.asarray(out[k])).view(np.uint8).tobytes()
                == np.atleast_1d(v[3]).view(np.uint8).tobytes() for k, (v, _) in leaves.items()},
    "specs": {k: str(out[k].sharding.spec) == str(P(*s[1:])) for k, (_, s) in leaves.items()}}))
"""


def test_taking_a_run_split_over_devices_moves_one_run():
  """A grid cohort's run axis split over `data` (4 x 2 fake devices, 8 runs): taking run 3
  for its save or eval moves one run's copy (an all-reduce of its per-device block: 256 x 32
  + 32 + 1 + 1 elements), where indexing would all-gather all 8 runs onto every device first;
  the values come back bit for bit (-0.0, NaN, bf16, int, bool) with the run's own sharding."""
  r = subprocess.run([sys.executable, "-c", TAKE_RUN_CHECK], cwd=ROOT,
                     env=runs.env(n_devices=8), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["gathers"] == 0, got
  assert got["reduced"] == 256 * 32 + 32 + 1 + 1, got
  assert all(got["bits"].values()) and all(got["specs"].values()), got
