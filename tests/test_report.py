"""The report CLI: a Fig-3-style table and PNGs from run directories (hand-written here)."""

import json
import pathlib
import subprocess

import runs
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.tools import report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def accs(mean: float) -> dict:
  vals = {a: mean + (i - 2.5) * 0.01 for i, a in enumerate(ATTRIBUTES)}
  return {**vals, "mean": sum(vals.values()) / len(vals)}


def fake_run(d: pathlib.Path, name: str, stages, results: dict | None, steps: int = 20):
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps({"name": name, "stages": list(stages), "seed": 0}))
  if results is not None:
    (d / "results.json").write_text(json.dumps(results))
  for stage in stages:
    if stage == "eval":
      continue
    (d / stage).mkdir()
    with open(d / stage / "metrics.jsonl", "w") as f:
      for s in range(1, steps + 1):
        f.write(json.dumps({"step": 25 * s, "loss": 4.0 / s, "lr": 1e-3,
                            "tokens_per_s": 1e4}) + "\n")
      f.write(json.dumps({"step": 25 * steps, "qa_test": 0.5}) + "\n")   # an eval line


def test_report_table_and_pngs(tmp_path):
  fake_run(tmp_path / "single", "single", ("pretrain", "finetune", "eval"),
           {"qa_test": accs(0.031), "qa_train": accs(0.995), "bio_recall": accs(0.98),
            "pprobe": [[0.1 * i + 0.02 * j for j in range(6)] for i in range(6)],
            "qprobe": accs(0.2)})
  fake_run(tmp_path / "mix", "multi5_permute", ("pretrain_mixed", "eval"),
           {"qa_test": accs(0.804), "qa_train": accs(0.97), "bio_recall": accs(0.99)})
  fake_run(tmp_path / "unfinished", "multi2", ("pretrain", "finetune", "eval"), None)
  out = tmp_path / "out" / "report.md"
  text, pngs = report.build_report(
      [str(tmp_path / n) for n in ("single", "mix", "unfinished")], str(out))
  assert out.read_text() == text
  lines = text.splitlines()
  row = lambda name: next(l for l in lines if l.startswith(f"| `{name}` |"))
  # Headline rows: ours (paper) for finetune and mixed.
  assert row("single") == "| `single` | 3.1 (9.7) | — (86.6) |"
  assert row("multi5_permute") == "| `multi5_permute` | — (96.6) | 80.4 (—) |"
  assert row("multi2") == "| `multi2` | — (41.1) | — (—) |"
  # Paper order: single, multi2, multi5_permute.
  assert lines.index(row("single")) < lines.index(row("multi2")) < lines.index(
      row("multi5_permute"))
  # Per-run rows: per-attribute test accuracy, train half, bio recall, notes.
  detail = [l for l in lines if l.startswith("| `single` | finetune |")]
  assert len(detail) == 1 and "| 99.5 | 98.0 |" in detail[0] and "| 0.6 |" in detail[0]
  unfinished = next(l for l in lines if l.startswith("| `multi2` | finetune |"))
  assert "no results.json" in unfinished and "— (41.1)" in unfinished
  assert "Q-probe" in text and "P-probe" in text
  names = {pathlib.Path(p).name for p in pngs}
  assert names == {"report_accuracy.png", "report_qprobe_vs_qa.png", "report_pprobe_single.png",
                   "report_loss_single.png",
                   "report_loss_mix.png", "report_loss_unfinished.png"}
  for p in pngs:
    data = pathlib.Path(p).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert pathlib.Path(p).name in text


def run_cli(*args):
  return subprocess.run([runs.python(), "-m", "kstore_jax.report", *args], cwd=ROOT,
                        env=runs.env(), capture_output=True, text=True, timeout=120, check=False)


def test_report_cli(tmp_path):
  fake_run(tmp_path / "a", "single_permute5", ("pretrain", "finetune", "eval"),
           {"qa_test": accs(0.5), "qa_train": accs(1.0)})
  (tmp_path / "a" / "finetune" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"st')
  r = run_cli(str(tmp_path / "a"), f"--out={tmp_path / 'r.md'}")
  assert r.returncode == 0, r.stderr
  assert "| `single_permute5` | 50.0 (70.0) | — (—) |" in r.stdout
  assert "results.json lacks bio_recall" in r.stdout
  assert (tmp_path / "r_accuracy.png").exists() and (tmp_path / "r_loss_a.png").exists()
  r = run_cli(str(tmp_path / "a"), str(tmp_path / "missing"), f"--out={tmp_path / 'x.md'}")
  assert r.returncode == 2
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and "missing" in err[0], r.stderr
  assert not (tmp_path / "x.md").exists()
  # a directory or nothing as --out: it drew 33 PNGs beside it, then failed with a traceback
  for out in (str(tmp_path / "a"), ""):
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli(str(tmp_path / "a"), f"--out={out}")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "--out=" in err[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
  r = run_cli("--help")
  assert r.returncode == 0 and "--out" in r.stdout


def test_ordering_against_the_paper_hand_computed(tmp_path):
  """Four rows the paper orders single_permute1 (4.4) < single (9.7) < multi5 (41.0) <
  multi5_permute (96.6); ours swaps the first two: rank differences (1, -1, 0, 0), so
  Spearman's rho = 1 - 6 * 2 / (4 * 15) = 0.8, and 5 of the 6 pairs agree. A mixed run and a
  row the paper lacks do not count."""
  ours = {"single": 0.01, "single_permute1": 0.02, "multi5": 0.10, "multi5_permute": 0.50,
          "single_permute5_fullname": 0.99}
  dirs = []
  for row, acc in ours.items():
    fake_run(tmp_path / row, row, ("pretrain", "finetune", "eval"), {"qa_test": accs(acc)})
    dirs.append(str(tmp_path / row))
  fake_run(tmp_path / "mixed", "single", ("pretrain_mixed", "eval"), {"qa_test": accs(0.99)})
  dirs.append(str(tmp_path / "mixed"))
  runs = [report.load_run(d, pathlib.Path(d).name) for d in dirs]
  o = report.paper_ordering(runs)
  assert o["rows"] == 4 and abs(o["spearman"] - 0.8) < 1e-12
  assert (o["pairs_same"], o["pairs"]) == (5, 6)
  text, _ = report.build_report(dirs, str(tmp_path / "out" / "report.md"))
  assert "Spearman's rho 0.80; 5 of the 6 row pairs" in text
  assert report.paper_ordering(runs[:2]) is None   # too few rows to order


def test_several_runs_of_one_cell_are_labelled(tmp_path):
  """A full finetune and a LoRA finetune of `single`: both in the cell, each with its run's
  label (they read as one run before, the chart and the ordering taking the last without a
  word); the ordering line says which one it counted."""
  dirs = []
  for row, acc in (("single_permute1", 0.02), ("multi5", 0.10), ("multi5_permute", 0.50)):
    fake_run(tmp_path / row, row, ("pretrain", "finetune", "eval"), {"qa_test": accs(acc)})
    dirs.append(str(tmp_path / row))
  for label, acc in (("full", 0.014), ("lora", 0.003)):
    fake_run(tmp_path / label, "single", ("pretrain", "finetune", "eval"),
             {"qa_test": accs(acc)})
    dirs.append(str(tmp_path / label))
  text, _ = report.build_report(dirs, str(tmp_path / "out" / "report.md"))
  [line] = [l for l in text.splitlines() if l.startswith("| `single` |")]
  assert "1.4 " in line and "(full) / 0.3 " in line and "(lora) (9.7)" in line, line
  assert "Of a row's several runs, the chart and this count the last: `single`: lora." in text
  assert sum(l.startswith("| `single` (full) |") or l.startswith("| `single` (lora) |")
             for l in text.splitlines()) == 2, text


def test_run_without_qa_training_stands_apart(tmp_path):
  """A run whose stages train no QA (pretrain, eval: results.json's evaluated_stage pretrain) is
  neither a finetune nor a mixed run: a headline column of its own without a paper number, its
  own training label per run, and outside the ordering against the paper. There the last run
  of a row counts: taken for single's finetune run, it would swap single and single_permute1
  (rho 0.5, not the 1.0 of the finetuned rows single_permute1 < single < multi5, as in the
  paper's 4.4 < 9.7 < 41.0)."""
  dirs = []
  for row, acc in {"single_permute1": 0.02, "single": 0.05, "multi5": 0.10}.items():
    fake_run(tmp_path / row, row, ("pretrain", "finetune", "eval"), {"qa_test": accs(acc)})
    dirs.append(str(tmp_path / row))
  fake_run(tmp_path / "single_base", "single", ("pretrain", "eval"),
           {"qa_test": accs(0.001), "evaluated_stage": "pretrain"})
  dirs.append(str(tmp_path / "single_base"))
  runs = [report.load_run(d, pathlib.Path(d).name) for d in dirs]
  assert [r.mode for r in runs] == ["finetune"] * 3 + [report.NO_QA]
  o = report.paper_ordering(runs)
  assert (o["rows"], o["spearman"], o["pairs_same"], o["pairs"]) == (3, 1.0, 3, 3)
  text, _ = report.build_report(dirs, str(tmp_path / "out" / "report.md"))
  lines = text.splitlines()
  assert ("| data | QA finetune: ours (paper) | mixed training: ours (paper) | "
          "no QA training: ours |") in lines
  assert "| `single` | 5.0 (9.7) | — (86.6) | 0.1 |" in lines
  assert "| `multi5` | 10.0 (41.0) | — (—) | — |" in lines
  assert "Spearman's rho 1.00; 3 of the 3 row pairs" in text
  # the detail table names each of the two `single` runs by its directory
  detail = [l for l in lines if l.startswith("| `single` (single_base) | no QA training |")]
  assert len(detail) == 1 and detail[0].startswith(
      "| `single` (single_base) | no QA training | 0.1 (—) |")


def test_stage_overrides_and_stale_evals_take_the_right_column(tmp_path):
  """`--config.stages=pretrain,finetune,eval` is saved as ["pretrain,finetune,eval"]: it is
  a finetune run (was: no QA training). A run extended from pretrain,eval to a finetune
  whose eval has not run yet holds the pretrained model's eval: not a finetune number."""
  fake_run(tmp_path / "a", "single", ("pretrain,finetune,eval",), {"qa_test": accs(0.2)})
  fake_run(tmp_path / "m", "single", ("pretrain_mixed,eval",), {"qa_test": accs(0.9)})
  fake_run(tmp_path / "s", "multi5", ("pretrain", "finetune", "eval"),
           {"qa_test": accs(0.01), "evaluated_stage": "pretrain", "pprobe": [[0.5] * 6] * 6})
  runs = [report.load_run(str(tmp_path / d), d) for d in "ams"]
  assert [r.mode for r in runs] == ["finetune", "mixed", "finetune"]
  assert "qa_test" not in runs[2].results and "pprobe" in runs[2].results
  assert any("QA evaluated after pretrain, not after finetune" in n for n in runs[2].notes)
  text, _ = report.build_report([str(tmp_path / d) for d in "ams"],
                                str(tmp_path / "out" / "report.md"))
  assert "| `multi5` | — (41.0) | — (—) |" in text.splitlines()
