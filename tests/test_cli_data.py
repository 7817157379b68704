"""The data and bench CLIs, run as a user would (subprocesses from the repository root)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=configs/base.py:tiny"


def cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, check=False)


def json_lines(stdout: str) -> list[dict]:
  return [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]


def test_data_stats():
  r = cli("kstore_jax.data", TINY, "--stats")
  assert r.returncode == 0, r.stderr
  s = json.loads(r.stdout.strip().splitlines()[-1])
  assert s["people"] == 500 and s["unique_names"] == s["people"]
  assert s["bios"] == s["people"] * s["copies_per_person"]
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
  r = cli("kstore_jax.bench", "nonsense", TINY)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
