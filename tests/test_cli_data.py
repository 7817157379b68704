"""The data and bench CLIs, run as a user would (subprocesses from the repository root)."""

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import pytest

import runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=configs/base.py:tiny"
GROUPED = "--config=configs/celeb_minority.py:tiny"   # groups `minority` and `star`


def cli(*args, timeout=120):
  return subprocess.run([runs.python(), "-m", *args], cwd=ROOT, env=runs.env(), capture_output=True,
                        text=True, timeout=timeout, check=False)


def json_lines(stdout: str) -> list[dict]:
  return [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]


def test_data_stats():
  r = cli("kstore_jax.data", TINY, "--stats")
  assert r.returncode == 0, r.stderr
  s = json.loads(r.stdout.strip().splitlines()[-1])
  assert s["people"] == 500 and s["unique_names"] == s["people"]
  assert s["bios"] == s["people"] * s["groups"]["all"]["copies_per_person"]
  assert s["groups"]["all"]["tokens_share"] == s["groups"]["all"]["doc_weight"] == 1.0
  assert len(s["templates_per_attribute"]) == 6
  assert min(s["templates_per_attribute"].values()) >= 50
  assert s["qa_train_people"] + s["qa_test_people"] == 500
  assert 0 < s["bio_tokens_min"] <= s["bio_tokens_mean"] <= s["bio_tokens_max"]
  assert all(lo <= hi for lo, hi in s["value_counts_min_max"].values())


def test_data_show():
  from configs import base
  from kstore_jax.data import population
  n = base.get_config("tiny").data.n_people
  name = population.make_population(0, n).full_name(0)
  r = cli("kstore_jax.data", TINY, "--show=2")
  assert r.returncode == 0, r.stderr
  assert name in r.stdout and "Answer:" in r.stdout
  assert r.stdout.count("--- bio ") == 2


def test_data_stats_per_group():
  """celeb_minority: 500 minority people with one bio each, 100 stars with five; half of the
  bio positions each (configs/celeb_minority.py); QA training only on half the stars."""
  r = cli("kstore_jax.data", GROUPED, "--stats")
  assert r.returncode == 0, r.stderr
  s = json.loads(r.stdout.strip().splitlines()[-1])
  g = s["groups"]
  assert list(g) == ["minority", "star"]
  assert [(g[n]["people"], g[n]["bios"], g[n]["copies_per_person"], g[n]["qa_train_people"])
          for n in g] == [(500, 500, 1, 0), (100, 500, 5, 50)]
  assert (s["people"], s["bios"], s["qa_train_people"]) == (600, 1000, 50)
  assert g["minority"]["tokens_share"] == g["star"]["tokens_share"] == 0.5
  assert abs(g["minority"]["doc_weight"] + g["star"]["doc_weight"] - 1) < 1e-3
  assert s["bio_tokens_sample"] == 1000          # every bio of both groups
  assert s["bio_tokens_min"] == min(g[n]["bio_tokens_min"] for n in g)
  lo, hi = sorted(g[n]["bio_tokens_mean"] for n in g)
  assert lo <= s["bio_tokens_mean"] <= hi


def test_data_show_per_group():
  r = cli("kstore_jax.data", GROUPED, "--show=2")
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("--- bio ") == 4
  assert r.stdout.count(" of group minority: person ") == 2
  stars = r.stdout.split(" of group star: ")
  assert len(stars) == 3 and stars[1].startswith("person 500 ") and "copy 1 of 5" in stars[2]
  assert "--- QA of person 0 " in r.stdout and "--- QA of person 500 " in r.stdout
  r = cli("kstore_jax.data", GROUPED, "--show=2", "--split=qa")
  assert r.returncode == 0, r.stderr
  shown = [l.split()[4] for l in r.stdout.splitlines() if l.startswith("--- QA of person ")]
  assert shown == ["0", "1", "500", "501"] and "--- bio " not in r.stdout


# 40 people, half of them QA-train, half of those held back as QA-valid: 10 / 10 / 20
VALID = [TINY, "--config.data.n_people=40", "--config.data.qa_valid_fraction=0.5"]


def valid_tool(*args):
  r = cli("kstore_jax.data", *VALID, *args)
  assert r.returncode == 0, r.stderr
  return r.stdout


def test_stats_and_show_tell_valid_people_from_test_people():
  """Valid people were counted as test people by --stats and labelled qa_test by --show."""
  from configs import base
  from kstore_jax.data import tokenizer, world as world_lib
  s = json.loads(valid_tool("--stats").strip().splitlines()[-1])
  assert (s["qa_train_people"], s["qa_test_people"]) == (10, 20)
  assert s["qa_valid_people"] == s["groups"]["all"]["qa_valid_people"] == 10
  cfg = base.get_config("tiny")
  cfg.data.update(n_people=40, qa_valid_fraction=0.5)
  world = world_lib.build_world(cfg, tokenizer.of_config(cfg))
  side = {int(p): k for k, ps in (("qa_train", world.train_people),
                                  ("qa_valid", world.valid_people),
                                  ("qa_test", world.test_people)) for p in ps}
  shown = {int(l.split()[4]): l.split(": ")[-1].removesuffix(" half")
           for l in valid_tool("--show=40", "--split=qa").splitlines()
           if l.startswith("--- QA of person ")}
  assert shown == side and sorted(side.values()).count("qa_valid") == 10


@pytest.mark.parametrize("arg, culprit", [
    ("--config=configs/no_such_config.py", "no_such_config.py"),
    ("--config.data.multy=3", "data.multy"),
])
def test_config_errors_are_one_line(arg, culprit):
  args = [arg] if arg.startswith("--config=") else [TINY, arg]
  r = cli("kstore_jax.data", *args, "--stats")
  assert r.returncode != 0
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and culprit in lines[0], r.stderr


@pytest.mark.parametrize("tool", ["kstore_jax.bench", "kstore_jax.data"])
def test_help(tool):
  r = cli(tool, "--help")
  assert r.returncode == 0, r.stderr
  assert "--config" in r.stdout


def test_bench_contract():
  r = cli("kstore_jax.bench", "data", TINY, "--workers=0", "--min_seconds=0.2",
          "--min_batches=5")
  assert r.returncode == 0, r.stderr
  out = {m["name"]: m for m in json_lines(r.stdout)}
  assert r.stdout.strip().splitlines()[-1].startswith("{")
  assert out["pipeline_tokens_per_s"]["value"] > 0 and out["pipeline_tokens_per_s"]["workers"] == 0
  assert out["pipeline_tokens_per_s"]["unit"] == "tokens/s"
  assert 0 < out["pipeline_packing_utilisation"]["value"] <= 1
  r = cli("kstore_jax.bench", "population", "--n=1000")
  assert r.returncode == 0, r.stderr
  out = {m["name"]: m for m in json_lines(r.stdout)}
  assert out["population_1k_bytes"]["value"] == 19 * 1000
  r = cli("kstore_jax.bench", "startup", "--startup_repeats=1")
  assert r.returncode == 0, r.stderr
  out = {m["name"]: m for m in json_lines(r.stdout)}
  assert set(out) == {"startup_ml_dtypes_cpu_s", "startup_jax_cpu_s", "startup_run_path_cpu_s"}
  assert all(m["value"] > 0 and m["wall_s"] > 0 and m["unit"] == "s" for m in out.values()), out
  assert out["startup_jax_cpu_s"]["ml_dtypes"] == importlib.metadata.version("ml_dtypes")
  r = cli("kstore_jax.bench", "nonsense", TINY)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_bench_with_groups():
  r = cli("kstore_jax.bench", "data", GROUPED, "--workers=0", "--min_seconds=0.2",
          "--min_batches=5")
  assert r.returncode == 0, r.stderr
  out = {m["name"]: m for m in json_lines(r.stdout)}
  assert out["world_build_s"]["bios"] == 1000 and out["pipeline_tokens_per_s"]["value"] > 0
  r = cli("kstore_jax.bench", "probe", GROUPED)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "data.groups" in lines[0], r.stderr


def test_tool_modules_the_tests_import_load_in_one_process():
  """A tool module defines its absl flags when imported, so two that define the same flag
  (`--workdir` in ask and bench) cannot share a process: a test that imports one beside another
  fails or passes by which tests pytest-xdist puts on the same worker. Tests therefore import
  only tool modules that load together (library code belongs below the tools)."""
  import re
  names = set()
  for path in (ROOT / "tests").glob("test_*.py"):
    text = path.read_text()
    names |= set(re.findall(r"from kstore_jax\.tools import (\w+)", text))
    names |= set(re.findall(r"from kstore_jax\.tools\.(\w+) import", text))
  assert names, "no tool module imported by the tests: the pattern above is stale"
  code = "; ".join(f"import kstore_jax.tools.{n}" for n in sorted(names))
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, check=False)
  assert r.returncode == 0, (sorted(names), r.stderr[-2000:])


EXIT_SCRIPT = """
import atexit, sys, threading, time
from kstore_jax.tools import cli
out = sys.argv[1]
def late():   # a non-daemon thread still working when main returns: joined, as at any exit
  time.sleep(0.3)
  open(out + ".thread", "w").write("joined")
threading.Thread(target=late).start()
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
print("buffered", end="")   # no newline, stdout a pipe: still in the buffer at the exit
cli.exit_without_teardown(eval(sys.argv[2]))
print("not reached")
"""


@pytest.mark.parametrize("code, status", [(None, 0), (0, 0), (3, 3), ("a message", 1)])
def test_exit_without_teardown_exits_as_the_interpreter_would(tmp_path, code, status):
  """The tools end their process without the interpreter's teardown (cli.run): the status
  sys.exit(code) would give, non-daemon threads joined, atexit handlers run, stdout flushed."""
  out = str(tmp_path / "f")
  r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, out, repr(code)], cwd=ROOT,
                     capture_output=True, text=True, timeout=60, check=False)
  assert r.returncode == status, r.stderr
  assert r.stdout == "buffered"
  assert r.stderr == ("a message\n" if status == 1 else ""), r.stderr
  assert pathlib.Path(out + ".thread").read_text() == "joined"
  assert pathlib.Path(out + ".atexit").read_text() == "ran"


def test_only_the_tool_as_program_skips_the_teardown(tmp_path):
  """`python -m <module>` is a program (cli.run ends it without the teardown); a tool run by
  other code (runpy from a script, cProfile, a debugger) returns to it: cProfile still writes
  its profile."""
  (tmp_path / "probe_mod.py").write_text(
      "from kstore_jax.tools import cli\nprint(cli.started_as_program('probe_mod'))\n")
  env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
  for cmd, want in (([sys.executable, "-m", "probe_mod"], "True"),
                    ([sys.executable, "-c",
                      "import runpy; runpy.run_module('probe_mod', run_name='__main__')"],
                     "False")):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                       check=False)
    assert (r.returncode, r.stdout.strip()) == (0, want), (cmd, r.stderr)
  prof = tmp_path / "report.prof"
  r = cli("cProfile", "-o", str(prof), "-m", "kstore_jax.report", "--help")
  assert r.returncode == 0 and prof.stat().st_size > 0, r.stderr
