"""The README's demo end to end (~12 min on 2 Zen 3 cores since session 33): `bash launch/test.sh -m slow`."""

import json
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_demo_shows_the_papers_gap(tmp_path):
  out = tmp_path / "tiny"
  subprocess.run(["bash", "launch/local.sh", str(out)], cwd=ROOT, check=True, timeout=3600)
  res = {row: json.loads((out / row / "results.json").read_text())
         for row in ("single", "multi5_permute")}
  for r in res.values():
    assert r["bio_recall"]["mean"] > 0.95      # both arms store the facts...
    assert r["qa_train"]["mean"] > 0.95        # ...and answer the trained questions
    assert len(r["pprobe"]) == 6 and "mean" in r["qprobe"]
  gap = res["multi5_permute"]["qa_test"]["mean"] - res["single"]["qa_test"]["mean"]
  assert gap >= 0.40, gap                      # only augmentation makes them extractable
  report = (out / "report.md").read_text()
  assert "multi5_permute" in report and "single" in report
