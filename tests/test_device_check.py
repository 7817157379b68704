"""`bash launch/device_check.sh --smoke`: the prepared GPU check end to end on this CPU at toy
sizes, so the first call on a lent GPU cannot fail on a typo; and its argument errors."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "KSTORE_NO_WHEELS": "1", "PYTHON": sys.executable}


def check(*args, timeout=400, env=ENV):
  return subprocess.run(["bash", "launch/device_check.sh", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_smoke_runs_every_section(tmp_path):
  out = tmp_path / "out"
  # the smoke's own deadline (170 s) is for a quiet machine; this test asks that every section
  # runs, so a loaded CI machine (the sections skipped at the deadline: a failure) gets more
  proc = check("--smoke", str(out), env={**ENV, "KSTORE_CHECK_SECONDS": "420"}, timeout=480)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  files = sorted(os.listdir(out))
  assert len(files) <= 8 and {"summary.txt", "bench.jsonl", "log.txt",
                              "results_small.json"} <= set(files), files
  summary = (out / "summary.txt").read_text()
  status = [l.split() for l in summary.splitlines()[1:] if l.startswith("  ")]
  sections = {s[0]: s[1] for s in status}
  assert set(sections) == {"env", "ceiling", "attention", "profile_xla", "train_xla",
                           "train_xla_cublas", "train_xla_gpt2_vocab", "train_xla_scan", "grid",
                           "small"}, summary
  assert all(how == "ok" for how in sections.values()), summary
  lines = [json.loads(l) for l in (out / "bench.jsonl").read_text().splitlines()]
  names = {(l["section"], l["name"]) for l in lines}
  for want in [("env", "environment"), ("ceiling", "matmul_bfloat16_flops_per_s"),
               ("attention", "attention_pallas_ms"), ("attention", "attention_pallas_docs_ms"),
               ("attention", "attention_tokamax_ms"),
               ("profile_xla", "profile_step_s"),
               ("train_xla", "train_tokens_per_s"), ("train_xla_gpt2_vocab", "train_step_s"),
               ("grid", "grid_speedup"), ("grid", "grid_eval_speedup")]:
    assert want in names, want
  # the train sections ranked by step time (the session's pick of the default kernel)
  steps = {l["section"]: l["value"] for l in lines if l["name"] == "train_step_s"}
  ranked = [l.split()[2] for l in summary.splitlines() if l.startswith("fastest ")]
  assert sorted(ranked) == sorted(steps) and ranked == sorted(steps, key=steps.get), ranked
  train = {l["name"]: l for l in lines if l["section"] == "train_xla"}
  projected = train["pretrain_projected_hours"]
  assert projected["value"] > 0 and projected["steps"] == 1000   # tiny's pretrain stage
  assert abs(projected["value"] - train["train_step_s"]["value"] * 1000 / 3600) < 2e-3
  vocab = {l["vocab"] for l in lines if l["section"] == "train_xla_gpt2_vocab" and "vocab" in l}
  assert vocab == {50304}
  results = json.loads((out / "results_small.json").read_text())
  assert set(results) == {"single_finetune", "single_mixed"}   # the grid's two runs asked for
  assert all(0.0 <= r["qa_test"]["mean"] <= 1.0 for r in results.values())
  for run in results:
    assert f"small {run}: qa_test" in summary and f"small {run}: qa_test" in proc.stdout


def test_bad_arguments_are_one_line(tmp_path):
  for args, culprit in ((["--sections=env,typo", str(tmp_path)], "typo"),
                        (["--fast", str(tmp_path)], "--fast"), ([], "OUTDIR")):
    proc = check(*args, timeout=60)
    assert proc.returncode == 2 and culprit in proc.stderr and len(
        proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
