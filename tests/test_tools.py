"""The run tools and launchers as a user calls them: `python -m kstore_jax.inspect`,
`python -m kstore_jax.ask` on one tiny trained workdir, and `launch/{tpu_pod,slurm_gpu}.sh
--dry-run` (plus shellcheck on every launch script when it is installed); and, on one run with
the probes, what results.json holds: only the configured stages' keys, an interval for every
accuracy."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import runs
from runs import env as run_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_PEOPLE = 60
PROBE_ARGS = ["--config.pprobe.steps=4", "--config.qprobe.steps=4",
              "--config.pprobe.batch_size=4", "--config.qprobe.batch_size=4"]
RUN_ARGS = [
    "--config=configs/single.py:tiny,probe", f"--config.data.n_people={N_PEOPLE}",
    "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
    "--config.model.d_ff=64", "--config.pretrain.steps=6", "--config.finetune.steps=4",
    "--config.train.save_every=3", "--config.pretrain.batch_size=4",
    "--config.finetune.batch_size=4", "--config.train.log_every=1", *PROBE_ARGS,
]
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "company", "company_city")


def tool(name, *args, cache=None, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([runs.python(), "-m", f"kstore_jax.{name}", *args], cwd=ROOT,
                        env=run_env(cache), capture_output=True, text=True, timeout=timeout,
                        check=False)


def script(name, *args, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(ROOT / "launch" / name), *args], cwd=ROOT,
                        env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                        timeout=60, check=False)


def one_line_error(r, prog, *culprits) -> str:
  assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith(f"kstore_jax.{prog}: error: "), lines[0]
  for c in culprits:
    assert c in lines[0], (c, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, jax_cache):
  """RUN_ARGS: pretrain (6 steps) -> finetune (4 steps) -> eval -> pprobe -> qprobe (4 steps
  each); checkpoints every 3 steps. The inspect and ask tests read its first three stages as
  a plain run's, the results tests its probes too (one run for both saves a process)."""
  wd = tmp_path_factory.mktemp("tools") / "run"
  r = subprocess.run([runs.python(), "-m", "kstore_jax.main", *RUN_ARGS, f"--workdir={wd}"],
                     cwd=ROOT, env=run_env(jax_cache), capture_output=True, text=True,
                     timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


@pytest.fixture(scope="module")
def population():
  from kstore_jax.data.population import make_population
  return make_population(0, N_PEOPLE)   # configs/base.py: seed 0


# -- inspect ----------------------------------------------------------------------------------
def test_inspect_lists_stages_steps_and_checkpoint(run_dir):
  r = tool("inspect", f"--workdir={run_dir}")
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  lines = {l.split()[0]: l for l in out.splitlines() if l.startswith("  pre") or
           l.startswith("  fine")}
  assert "checkpoint steps: 3, 6" in lines["pretrain"] and "final/: yes" in lines["pretrain"]
  assert "checkpoint steps: 3, 4" in lines["finetune"] and "final/: yes" in lines["finetune"]
  assert "checkpoint pretrain/checkpoints/6" in out          # the default: newest pretrain step
  assert "embed/embedding" in out and "P(" in out            # param tree with shardings
  assert "optimizer state:" in out and "train step 6" in out
  assert "data iterator (grain)" in out and "batch_idx" in out
  assert 'last metrics line (pretrain): {' in out and '"step": 6' in out


def test_inspect_json(run_dir):
  r = tool("inspect", f"--workdir={run_dir}", "--stage=finetune", "--json")
  assert r.returncode == 0, r.stderr[-3000:]
  d = json.loads(r.stdout)
  assert d["stages"]["pretrain"]["steps"] == [3, 6] and d["stages"]["pretrain"]["final"]
  assert d["stages"]["finetune"]["steps"] == [3, 4] and d["stages"]["finetune"]["final"]
  assert d["config"]["data"]["n_people"] == N_PEOPLE
  c = d["checkpoint"]
  assert d["stage"] == "finetune" and c["step"] == 4 and c["state_step"] == 4
  for p in c["params"]:
    assert p["size"] == int(np.prod(p["shape"])), p
  total = sum(p["size"] for p in c["params"])
  assert c["param_count"]["total"] == total == sum(c["param_count"]["by_module"].values())
  assert set(c["param_count"]["by_module"]) == {"block0", "embed", "ln_f"}
  # AdamW: mu and nu mirror the params (+ counters).
  assert c["opt_state"]["leaves"] > 2 * len(c["params"])
  assert c["opt_state"]["size"] >= 2 * total
  assert c["restored"]["ok"] and c["restored"]["nonfinite_params"] == 0
  (state,) = c["data_state"].values()   # one process
  assert state["batch_idx"] > 0
  assert d["last_metrics"]["step"] == 4
  assert d["results"]["qa_test"]["mean"] >= 0.0
  # final/ (the exported params) has the same parameter count.
  r = tool("inspect", f"--workdir={run_dir}", "--stage=pretrain", "--step=final", "--json")
  assert r.returncode == 0, r.stderr[-3000:]
  f = json.loads(r.stdout)["checkpoint"]
  assert f["kind"] == "final" and f["param_count"]["total"] == total


@pytest.mark.parametrize("victim", ["data_file", "metadata"])
def test_inspect_corrupt_checkpoint_names_the_step(run_dir, tmp_path, victim):
  wd = tmp_path / "run"
  shutil.copytree(run_dir, wd)
  state = wd / "pretrain" / "checkpoints" / "6" / "state"
  if victim == "data_file":   # the largest array file: metadata still reads, arrays do not
    target = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  else:
    target = state / "_METADATA"
  with open(target, "r+b") as f:
    f.truncate(7)
  r = tool("inspect", f"--workdir={wd}")
  one_line_error(r, "inspect", "step 6", str(state))
  # The older step still reads.
  r = tool("inspect", f"--workdir={wd}", "--step=003", "--json")   # (its directory is "3")
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout)["checkpoint"]["state_step"] == 3


def test_inspect_errors(run_dir, tmp_path):
  missing = tmp_path / "nope"
  one_line_error(tool("inspect", f"--workdir={missing}"), "inspect", str(missing))
  one_line_error(tool("inspect", f"--workdir={run_dir}", "--stage=pretrain_mixed"), "inspect",
                 "pretrain_mixed")
  one_line_error(tool("inspect", f"--workdir={run_dir}", "--step=5"), "inspect", "step 5",
                 "3, 6")
  # a run that has not saved yet: listed, not an error about a --stage nobody passed
  young = tmp_path / "young"
  (young / "pretrain").mkdir(parents=True)
  shutil.copy(run_dir / "config.json", young / "config.json")
  shutil.copy(run_dir / "pretrain" / "metrics.jsonl", young / "pretrain" / "metrics.jsonl")
  r = tool("inspect", f"--workdir={young}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "no checkpoint yet in stage pretrain" in r.stdout and "last metrics line" in r.stdout
  one_line_error(tool("inspect", f"--workdir={young}", "--stage=pretrain"), "inspect",
                 "no checkpoint and no final/")


def test_resume_after_a_process_count_change(run_dir, tmp_path, jax_cache):
  """The README's elastic-resume claim across host counts: a step saved by 2 processes (Grain
  writes process_<i>-of-2.json) resumes on 1 process on exactly the next batch."""
  wd = tmp_path / "run"
  shutil.copytree(run_dir, wd)
  for p in ("pretrain/final", "pretrain/checkpoints/6", "finetune", "results.json"):
    shutil.rmtree(wd / p) if (wd / p).is_dir() else (wd / p).unlink()
  data = wd / "pretrain" / "checkpoints" / "3" / "data"
  state = (data / "process_0-of-1.json").read_text()
  (data / "process_0-of-1.json").unlink()
  for i in range(2):
    (data / f"process_{i}-of-2.json").write_text(state)
  r = subprocess.run([runs.python(), "-m", "kstore_jax.main", *RUN_ARGS, f"--workdir={wd}",
                      "--config.stages=pretrain"], cwd=ROOT, env=run_env(jax_cache),
                     capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 3" in r.stdout
  def losses(d):
    return {m["step"]: m["loss"] for m in map(json.loads, open(d / "pretrain/metrics.jsonl"))}
  assert losses(wd) == losses(run_dir)


ACCURACIES = {"qa_test", "qa_test_by_tokens", "qa_train", "bio_recall"}
EVAL_KEYS = ACCURACIES | {k + "_ci" for k in ACCURACIES} | {"evaluated_stage"}
PROBE_KEYS = {"pprobe", "pprobe_ci", "qprobe", "qprobe_ci", "probe_baseline"}


def results_lines(out: str) -> dict[str, str]:
  """{stage: its line} of the inspect report's results.json section."""
  lines = out.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("results.json ("))
  section = []
  for l in lines[start + 1:]:
    if not l.startswith("  "):
      break
    section.append(l)
  return {l.split()[0]: l for l in section}


ACCURACY_KEYS = ("qa_test", "qa_train", "bio_recall", "qa_test_by_tokens", "pprobe", "qprobe")


def intervals(value, ci, path=""):
  """(path, accuracy, interval leaf) for every leaf of `ci` (results.json's `<key>_ci`), the
  accuracy at the same place in `value`."""
  if isinstance(ci, dict) and set(ci) - {"n_eff"} == {"lo", "hi", "n"}:
    return [(path, value, ci)]
  items = ci.items() if isinstance(ci, dict) else enumerate(ci)
  return [leaf for k, c in items for leaf in intervals(value[k], c, f"{path}/{k}")]


def test_results_json_has_an_interval_for_every_accuracy(run_dir, tmp_path):
  """Issue 22 item 7: every accuracy of results.json has its 95% Wilson interval (`<key>_ci`)
  over the right number of examples, containing it; report and inspect print them."""
  from kstore_jax.eval import qa_eval
  from kstore_jax.tools import report
  res = json.loads((run_dir / "results.json").read_text())
  half = N_PEOPLE // 2                          # qa_train_fraction 0.5: 30 test, 30 train
  for key in ACCURACY_KEYS:
    assert key + "_ci" in res, key
    assert res["produced_by"][key + "_ci"] == res["produced_by"][key]
  leaves = [(key, *leaf) for key in ACCURACY_KEYS
            for leaf in intervals(res[key], res[key + "_ci"])]
  for key, path, acc, ci in leaves:
    assert 0.0 <= ci["lo"] <= acc <= ci["hi"] <= 1.0, (key, path, acc, ci)
    assert ci["n"] >= 1
    k = round(acc * ci["n"])
    assert abs(k - acc * ci["n"]) < 1e-6 or "n_eff" in ci, (key, path, acc, ci)   # over n
    if "n_eff" in ci:   # pooled over attributes: at the effective count, people to questions
      assert 0 < ci["n_eff"] <= ci["n"], (key, path, ci)
      assert (ci["lo"], ci["hi"]) == pytest.approx(qa_eval.wilson(acc * ci["n_eff"],
                                                                  ci["n_eff"]))
    else:
      assert (ci["lo"], ci["hi"]) == pytest.approx(qa_eval.wilson(k, ci["n"]))
  n = {(key, path): ci["n"] for key, path, _, ci in leaves}
  for key in ("qa_test", "qa_train", "bio_recall"):
    assert n[key, "/mean"] == 6 * half and n[key, "/birth_date"] == half, key
    assert "n_eff" not in res[key + "_ci"]["major"]
    assert half - 1 <= res[key + "_ci"]["mean"]["n_eff"] <= 6 * half, key   # people..questions
  assert n["qprobe", "/mean"] == 6 * half and n["qprobe", "/major"] == half
  assert len(res["pprobe_ci"]) == 6 and n["pprobe", "/0/0"] == half
  by_tokens = res["qa_test_by_tokens_ci"]["all"]
  assert sum(c["n"] for c in by_tokens.values()) == 6 * half
  md, _ = report.build_report([str(run_dir)], str(tmp_path / "report.md"))
  mean, ci = res["qa_test"]["mean"], res["qa_test_ci"]["mean"]
  assert f"{100 * mean:.1f} [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}]" in md
  # inspect shows each mean with its interval instead of listing the _ci keys
  out = tool("inspect", f"--workdir={run_dir}", "--restore=false").stdout
  assert f"qa_test {mean:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]" in out, out
  assert "_ci" not in out, out


def test_results_json_holds_only_the_configured_stages(run_dir, tmp_path, jax_cache):
  """A run with the `probe` variant (the shared run, copied), then the same workdir
  without it (only `stages` differs, as the resume rule allows): the rerun's results.json has
  no pprobe/qprobe/probe_baseline left, `produced_by` names each key's stage, inspect lists
  the keys under their stage, and report still reads the file."""
  wd = tmp_path / "run"
  shutil.copytree(run_dir, wd)

  def main(config):
    r = tool("main", f"--config={config}", *RUN_ARGS[1:], f"--workdir={wd}",
             cache=jax_cache, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((wd / "results.json").read_text())

  def inspect_results():
    r = tool("inspect", f"--workdir={wd}", "--restore=false")
    assert r.returncode == 0, r.stderr[-3000:]
    return results_lines(r.stdout)

  res1 = json.loads((wd / "results.json").read_text())
  assert set(res1) == EVAL_KEYS | PROBE_KEYS | {"produced_by"}
  assert res1["produced_by"] == {**{k: "eval" for k in EVAL_KEYS}, "pprobe": "pprobe",
                                 "pprobe_ci": "pprobe", "qprobe": "qprobe", "qprobe_ci": "qprobe",
                                 "probe_baseline": "qprobe"}
  lines = inspect_results()
  assert set(lines) == {"eval", "pprobe", "qprobe"}, lines
  assert "qa_test " in lines["eval"] and "evaluated_stage=finetune" in lines["eval"], lines
  assert "pprobe" in lines["pprobe"].split(None, 1)[1] and "qprobe " in lines["qprobe"], lines

  res2 = main("configs/single.py:tiny")
  assert set(res2) == EVAL_KEYS | {"produced_by"}, sorted(res2)
  assert res2["produced_by"] == {k: "eval" for k in EVAL_KEYS}
  assert res2["qa_test"] == res1["qa_test"]   # the same finetuned model, evaluated again
  lines = inspect_results()
  assert set(lines) == {"eval"}, lines
  r = tool("report", str(wd), f"--out={tmp_path / 'report.md'}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "results.json lacks" not in r.stdout, r.stdout
  assert f"{100 * res2['qa_test']['mean']:.1f}" in r.stdout, r.stdout

# -- ask --------------------------------------------------------------------------------------
def test_ask_by_name_prints_every_attribute_with_truth(run_dir, population, jax_cache):
  name = population.full_name(0)
  r = tool("ask", f"--workdir={run_dir}", f"--name={name}", cache=jax_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert name in out and "finetune/final" in out   # default: the latest finished stage
  truths = population.values(0)
  for a in ATTRIBUTES:
    assert f" {a} " in out, a
    assert f"truth: {truths[a]}" in out, a
  assert sum(out.count(m) for m in ("✓", "✗")) == 6
  assert out.strip().endswith("/6 correct")


def test_ask_attribute_filter_and_json(run_dir, population, jax_cache):
  r = tool("ask", f"--workdir={run_dir}", "--person=3", "--attribute=university,major",
           "--stage=pretrain", "--json", cache=jax_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  d = json.loads(r.stdout)
  assert d["stage"] == "pretrain" and d["asked"] == 2
  assert [a["attribute"] for a in d["answers"]] == ["university", "major"]
  for a in d["answers"]:
    assert a["person"] == 3 and a["name"] == population.full_name(3)
    assert a["truth"] == population.values(3)[a["attribute"]]
    assert a["question"].endswith("?\nAnswer:") and isinstance(a["correct"], bool)


def test_ask_unknown_name_and_bad_prompt(run_dir):
  one_line_error(tool("ask", f"--workdir={run_dir}", "--name=Nobody Q Public"), "ask",
                 "Nobody Q Public")
  one_line_error(tool("ask", f"--workdir={run_dir}", "--prompt=snow ☃ man"), "ask",
                 "--prompt", "outside the model vocabulary")
  # flags of another mode did nothing (person 0 was asked, labelled as always)
  one_line_error(tool("ask", f"--workdir={run_dir}", "--person=0", "--split=test", "--seed=7"),
                 "ask", "--split goes with --random, not --person")
  one_line_error(tool("ask", f"--workdir={run_dir}", "--person=0", "--max_new=5"), "ask",
                 "--max_new goes with --prompt, not --person")


def test_ask_prompt_completes(run_dir, population, jax_cache):
  prompt = f"{population.full_name(1)} was born on"
  r = tool("ask", f"--workdir={run_dir}", f"--prompt={prompt}", "--max_new=5", "--json",
           cache=jax_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  d = json.loads(r.stdout)
  assert d["prompt"] == prompt and 0 <= d["new_tokens"] <= 5
  assert isinstance(d["completion"], str)


ASK_QUESTION = re.compile(r"^  ([✓✗]) (\S+) +Q: ([^\n]*)\n +model: (.*?) +truth: ([^\n]*)$",
                          re.S)
ASK_HEADER = re.compile(r"^(.+)  \(person (\d+), QA (?:in training|held back for tuning|held "
                        r"out) \((train|valid|test)(?: half)?\); model: (\w+)/final\)$")


def parse_ask(text: str) -> tuple[list[dict], tuple[int, int]]:
  """`ask`'s text output as one record per question, and its closing 'n/M correct' counts."""
  lines = text.rstrip("\n").split("\n")
  total = re.fullmatch(r"(\d+)/(\d+) correct", lines[-1])
  assert total, lines[-1]
  # a question is its mark line and the lines up to the next mark or person line
  chunks, person = [], None
  for line in lines[:-1]:
    header = ASK_HEADER.match(line)
    if header:
      person = header
    elif line.startswith(("  ✓ ", "  ✗ ")):
      chunks.append([person, line])
    else:
      chunks[-1][1] += "\n" + line
  out = []
  for header, chunk in chunks:
    q = ASK_QUESTION.match(chunk)
    assert q, chunk
    out.append(dict(name=header[1], person=int(header[2]),
                    split=header[3],
                    stage=header[4], mark=q[1], attribute=q[2], question=q[3], answer=q[4],
                    truth=q[5]))
  return out, (int(total[1]), int(total[2]))


def test_ask_random_split_compares_with_truth(run_dir, population, jax_cache):
  """`--random=N --split=test|train`: --random above the half's size asks everyone of that half
  once; the two halves split the population in two; every question prints the population's
  value as the truth and ✓ exactly when the model's answer is that value; the closing count is
  the number of ✓ out of 6 per person (text), or `correct` / `asked` (--json)."""
  r = tool("ask", f"--workdir={run_dir}", f"--random={N_PEOPLE}", "--split=test", "--seed=3",
           cache=jax_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  records, (n_right, n_asked) = parse_ask(r.stdout)
  test_people = sorted({rec["person"] for rec in records})
  assert len(records) == n_asked == len(ATTRIBUTES) * len(test_people)
  assert n_right == sum(rec["mark"] == "✓" for rec in records)
  for rec in records:
    p = rec["person"]
    assert rec["split"] == "test" and rec["stage"] == "finetune"
    assert rec["name"] == population.full_name(p) and rec["name"] in rec["question"]
    assert rec["truth"] == population.values(p)[rec["attribute"]], rec
    assert (rec["mark"] == "✓") == (rec["answer"] == rec["truth"]), rec
  assert [rec["attribute"] for rec in records] == list(ATTRIBUTES) * len(test_people)

  r = tool("ask", f"--workdir={run_dir}", f"--random={N_PEOPLE}", "--split=train", "--json",
           cache=jax_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  d = json.loads(r.stdout)
  train_people = sorted({a["person"] for a in d["answers"]})
  assert d["asked"] == len(d["answers"]) == len(ATTRIBUTES) * len(train_people)
  assert d["correct"] == sum(a["correct"] for a in d["answers"])
  for a in d["answers"]:
    assert a["qa_split"] == "train" and a["name"] == population.full_name(a["person"])
    assert a["truth"] == population.values(a["person"])[a["attribute"]], a
    assert a["correct"] == (a["answer"] == a["truth"]), a
  # configs/base.py: qa_train_fraction 0.5 -> two disjoint halves of everyone
  assert len(test_people) == len(train_people) == N_PEOPLE // 2
  assert sorted(test_people + train_people) == list(range(N_PEOPLE))

  r = tool("ask", f"--workdir={run_dir}", "--random=3", "--split=test", "--seed=3", "--json",
           cache=jax_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  few = [a["person"] for a in json.loads(r.stdout)["answers"]]
  assert len(set(few)) == 3 and set(few) <= set(test_people) and len(few) == 18


def import_ask():
  """kstore_jax.tools.ask in this process: each tool defines its flags at import, and another
  tool imported by an earlier test (bench) holds the same name here."""
  from absl import flags
  if "kstore_jax.tools.ask" not in sys.modules:
    for name in ("workdir",):
      if name in flags.FLAGS:
        delattr(flags.FLAGS, name)
  from kstore_jax.tools import ask
  return ask


def test_ask_marks_right_and_wrong_answers(run_dir, population, monkeypatch):
  """The tiny run answers nothing right, so give `ask` the answers: the true value + EOT (must
  be ✓), the true value running on without EOT, and another person's value (✗ unless it is the
  same string): a mark is ✓ exactly when the printed answer is the population's value, and the
  count adds up."""
  ask = import_ask()
  from kstore_jax.eval import qa_eval
  asker = ask.Asker(str(run_dir))
  people = asker.random_people(4, seed=0, split="train")
  eot = asker.world.renderer.eot_id

  def forced(model, params, world, qs, max_new):
    out = np.full((len(qs.attrs_N), max_new), eot, np.int32)
    for i in range(len(qs.attrs_N)):
      kind = i % 3
      src = i if kind < 2 else (i + len(ATTRIBUTES)) % len(qs.attrs_N)   # next person's
      value = qs.answers_NW[src, :qs.alens_N[src] - 1]
      out[i, :len(value)] = value
      if kind == 1:
        out[i, len(value):len(value) + 2] = value[:2]                     # no EOT: runs on
    return out

  monkeypatch.setattr(qa_eval, "answer", forced)
  records = asker.ask(people)
  text = ask.format_records(records, asker.stage)
  parsed, (n_right, n_asked) = parse_ask(text)
  assert n_asked == len(parsed) == len(records) == 4 * len(ATTRIBUTES)
  marks = [rec["mark"] for rec in parsed]
  assert n_right == marks.count("✓")
  for i, (rec, got) in enumerate(zip(parsed, records)):
    truth = population.values(rec["person"])[rec["attribute"]]
    assert rec["truth"] == got["truth"] == truth
    assert rec["answer"] == got["answer"]
    assert (rec["mark"] == "✓") == got["correct"] == (got["answer"] == truth), (i, rec)
    if i % 3 == 0:
      assert rec["mark"] == "✓", rec
    if i % 3 == 1:
      assert rec["mark"] == "✗" and got["answer"].startswith(truth), rec
  assert 0 < n_right < n_asked


def test_ask_labels_and_draws_the_qa_valid_people(monkeypatch):
  """With data.qa_valid_fraction > 0, people held back for tuning are neither trained on nor
  test: `ask` labels every person by the split results.json counts them in (qa_train /
  qa_valid / qa_test), in its records and its text, and --split=train|valid|test draws exactly
  that split's people; a run without valid people refuses --split=valid. In process, on a toy
  world, the answers forced (no model)."""
  import dataclasses
  from configs import base
  from kstore_jax.configlib import ConfigError
  from kstore_jax.data import tokenizer as tokenizer_lib, world as world_lib
  from kstore_jax.eval import qa_eval
  ask = import_ask()
  cfg = base.get_config("tiny")
  cfg.data.n_people, cfg.data.qa_valid_fraction = 40, 0.2
  world = world_lib.build_world(cfg, tokenizer_lib.train_tokenizer(8192))
  asker = ask.Asker.__new__(ask.Asker)   # the loaded run's parts, without a workdir
  asker.world, asker.model, asker.params = world, None, None
  monkeypatch.setattr(qa_eval, "answer", lambda model, params, w, qs, max_new: np.full(
      (len(qs.attrs_N), max_new), w.renderer.eot_id, np.int32))
  splits = {"train": world.train_people, "valid": world.valid_people, "test": world.test_people}
  assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(40))
  for split, people in splits.items():
    assert len(people), split
    drawn = asker.random_people(40, seed=0, split=split)
    assert sorted(drawn) == people.tolist()
    records = asker.ask(drawn[:2], ["major"])
    assert [r["qa_split"] for r in records] == [split] * 2
    parsed, _ = parse_ask(ask.format_records(records, "finetune"))
    assert [r["split"] for r in parsed] == [split] * 2
  asker.world = dataclasses.replace(world, qa_valid=np.zeros_like(world.qa_valid))
  with pytest.raises(ConfigError, match="--split=valid: this run has no valid people"):
    asker.random_people(3, seed=0, split="valid")

# -- launchers --------------------------------------------------------------------------------
TPU_ENV = {"KSTORE_ZONE": "us-west4-a", "KSTORE_PROJECT": "my-project",
           "KSTORE_TPU_NAME": "kstore-test", "KSTORE_ACCELERATOR": "v5litepod-16"}


@pytest.mark.parametrize("repo", ["copy", "https://github.com/example/kstore_jax.git"])
def test_tpu_pod_dry_run(repo):
  r = script("tpu_pod.sh", "--dry-run", "--delete", "--config=configs/single.py:small",
             "--workdir=/mnt/shared/runs/single", "--", "--config.model.dtype=bfloat16",
             env={**TPU_ENV, "KSTORE_REPO": repo})
  assert r.returncode == 0, r.stderr
  cmds = [l for l in r.stdout.splitlines() if not l.startswith("#")]
  assert cmds and all(l.startswith("+ ") for l in cmds), r.stdout
  text = r.stdout
  for key in ("gcloud compute tpus tpu-vm create kstore-test", "--zone=us-west4-a",
              "--project=my-project", "--accelerator-type=v5litepod-16", "--worker=all",
              "pip install", ".[tpu]", "python -m kstore_jax.main",
              "--config=configs/single.py:small", "--workdir=/mnt/shared/runs/single",
              "--config.model.dtype=bfloat16", "JAX_COORDINATOR_ADDRESS=",
              "--worker=0", "tail ", "gcloud compute tpus tpu-vm delete kstore-test"):
    assert key in text, key
  assert ("tpu-vm scp" in text) == (repo == "copy")
  assert ("git clone" in text) == (repo != "copy")
  # The order: create, code, install, start, logs, delete.
  order = [text.index(k) for k in ("tpu-vm create", "pip install", "kstore_jax.main",
                                   "--worker=0", "tpu-vm delete")]
  assert order == sorted(order)


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: one TPU "worker" whose home directory is $FAKE_HOME.
echo "gcloud $*" >> "$FAKE_HOME/gcloud.log"
args=("$@")
case " $* " in
  *" describe "*)
    [ -f "$FAKE_HOME/.created" ] || exit 1
    case " $* " in *ipAddress*) echo 127.0.0.1 ;; *) echo READY ;; esac ;;
  *" create "*) touch "$FAKE_HOME/.created" ;;
  *" delete "*) rm -f "$FAKE_HOME/.created" ;;
  *" scp "*) cp "${args[4]}" "$FAKE_HOME/${args[5]#*:}" ;;
  *" ssh "*)
    for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
    case "$cmd" in *"pip install"*)   # no downloads: the worker uses this venv
      ln -sfn "$FAKE_VENV" "$FAKE_HOME/kstore_jax/.venv"; exit 0 ;; esac
    cmd="${cmd//kstore_jax\[.\]main/no_such_process}"   # other runs on this machine
    cd "$FAKE_HOME" && HOME="$FAKE_HOME" bash -c "$cmd" ;;
  *) exit 3 ;;
esac
"""


def test_tpu_pod_runs_its_commands(tmp_path):
  """The whole launch against a fake gcloud: the remote commands really run (quoting, the
  detached start, the log follow, the run's exit status) and --delete runs at the end."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  home.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = {**TPU_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_HOME": str(home),
         "FAKE_VENV": sys.prefix, "KSTORE_POLL_S": "1", "KSTORE_NUM_PROCESSES": "1",
         "TMPDIR": str(tmp_path)}
  # what git ignores stays here (.aot/'s 450 MB CUDA plugin was copied to every worker): an
  # ignored file made for the test under build/
  ignored = ROOT / "build" / f"tpu_pod_test_{os.getpid()}"
  ignored.parent.mkdir(exist_ok=True)
  ignored.write_text("not for the workers")
  try:
    # A config error: kstore_jax.main starts and fails at once with status 2.
    r = script("tpu_pod.sh", "--delete", "--config=configs/single.py:tiny", "--workdir=runs/x",
               "--", "--config.data.n_people=1", env=env)
  finally:
    ignored.unlink()
    if not any(ignored.parent.iterdir()):
      ignored.parent.rmdir()
  assert not (home / "kstore_jax" / "build" / ignored.name).exists()
  assert r.returncode == 2, (r.stdout[-3000:], r.stderr[-3000:])
  assert "kstore_jax.main: error: data.n_people=1" in r.stdout   # worker 0's log, followed
  assert "the run exited with status 2" in r.stderr
  assert (home / "kstore_jax" / "kstore_jax" / "main.py").is_file()   # the tree was copied
  log = (home / "gcloud.log").read_text()
  assert "tpu-vm create kstore-test" in log and "tpu-vm delete kstore-test" in log
  assert not (home / ".created").exists()


def test_slurm_dry_run():
  r = script("slurm_gpu.sh", "--dry-run", "--nodes=4", "--gpus-per-node=8", "--partition=gpu",
             "--time=02:00:00", "--config=configs/single.py:small", "--workdir=/shared/runs/s",
             "--", "--config.model.dtype=bfloat16")
  assert r.returncode == 0, r.stderr
  text = r.stdout
  for key in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
              "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00", "pip install", ".[cuda12]",
              "srun ", "--cpus-per-task=8 ", "-m kstore_jax.main", "--workdir=/shared/runs/s",
              "--config.model.dtype=bfloat16", "+ sbatch "):
    assert key in text, key
  script_text = text.split("\n", 1)[1].split("\n+ ")[0]
  assert script_text.startswith("#!/bin/bash")
  assert subprocess.run(["bash", "-n"], input=script_text, text=True).returncode == 0


@pytest.mark.parametrize("name, args, culprit", [
    ("report", ["--bogus"], "'bogus'"), ("inspect", ["--bogus"], "'bogus'"),
    ("ask", ["--bogus"], "'bogus'"), ("grid", ["--bogus"], "'bogus'"),
    ("bench", ["train", "--config=configs/tiny.py", "--train_steps=abc"], "--train_steps=abc"),
    # 0 steps timed printed NaN step times with exit 0
    ("bench", ["train", "--config=configs/tiny.py", "--train_steps=0"], "--train_steps=0"),
    # a mistyped mode printed nothing with exit 0
    ("bench", ["grid", "--config=configs/grids/demo.py:tiny", "--grid_modes=vmpa"], "'vmpa'")])
def test_bad_flag_is_one_line(name, args, culprit):
  r = tool(name, *args)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert lines[0].startswith(f"kstore_jax.{name}: error: ") and culprit in lines[0], lines[0]


def test_launch_errors(tmp_path):
  r = script("tpu_pod.sh", "--dry-run", "--config=configs/single.py", "--workdir=x",
             env={"KSTORE_ZONE": ""})
  assert r.returncode == 2 and "KSTORE_ZONE" in r.stderr
  # the workers run from their copy of the repository: an absolute path into it is passed
  # relative to it, a file outside it is refused before any VM is made
  zone = {"KSTORE_ZONE": "z"}
  r = script("tpu_pod.sh", "--dry-run", f"--config={ROOT}/configs/single.py:small",
             "--workdir=x", env=zone)
  assert r.returncode == 0 and "kstore_jax.main --config=configs/single.py:small " in r.stdout
  r = script("tpu_pod.sh", "--dry-run", f"--config={tmp_path / 'mine.py'}", "--workdir=x",
             env=zone)
  assert r.returncode == 2 and "no such file" in r.stderr and "gcloud" not in r.stdout
  (tmp_path / "mine.py").write_text((ROOT / "configs/tiny.py").read_text())
  r = script("tpu_pod.sh", "--dry-run", f"--config={tmp_path / 'mine.py'}", "--workdir=x",
             env=zone)
  assert r.returncode == 2 and "outside the repository" in r.stderr and "gcloud" not in r.stdout
  r = script("slurm_gpu.sh", "--dry-run", "--config=configs/single.py")
  assert r.returncode == 2 and "--workdir" in r.stderr
  r = script("slurm_gpu.sh", "--dry-run", "--bogus")
  assert r.returncode == 2 and "--bogus" in r.stderr
  for args, culprit in ((["--bogus"], "'--bogus'"), (["a", "b"], "'b'")):   # before any install
    r = script("local.sh", *args)
    assert r.returncode == 2 and culprit in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_launch_scripts():
  scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
  r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stdout[-4000:]


# -- --help -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,flags", [("inspect", ("--workdir", "--stage", "--step", "--json")),
                                        ("ask", ("--name", "--attribute", "--prompt",
                                                 "--random", "--max_new"))])
def test_tool_help(name, flags):
  r = tool(name, "--help")
  assert r.returncode == 0, r.stderr[-2000:]
  for f in flags:
    assert f in r.stdout, f


@pytest.mark.parametrize("name", ["tpu_pod.sh", "slurm_gpu.sh", "local.sh"])
def test_script_help(name):
  r = script(name, "--help")
  assert r.returncode == 0 and r.stdout.strip(), r.stderr
  assert "set -euo" not in r.stdout
