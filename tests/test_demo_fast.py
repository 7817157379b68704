"""The paper's effect in the default suite (issue 22 item 12): at a setting that trains in
about two minutes on 2 cores, multi5_permute beats single on held-out people's QA by a clear
margin while both arms store their bios, so a change that breaks the effect (knowledge stored
but no longer extractable, an augmentation that stops augmenting, a QA split that leaks or
mixes people up) fails here and not only in the slow demo (test_demo_slow.py).

Setting: the demo's rows (configs/single.py, configs/multi5_permute.py at `tiny`) with 200
people of whom 80% are QA-finetuned on (160) and 40 held out (240 questions), a 2-layer
d_model-128 model, 400 pretraining steps of 16 x 128 positions at peak lr 5e-3 (multi5: ~13
passes over its 1,000 bios), 100 finetune steps; eval on the 40 held-out people and 40 of
the QA-trained ones (the held-out numbers are those of every person held out). Both arms run
side by side, each pinned to a core of its own (~105 s an arm alone on a core, session 18).

Measured (QA test % held out, bio recall % in brackets), seeds 0 / 1 / 2, session 25 (after
the weight-decay fix; each arm pinned to a core as here):
  single          2.1 (100.0) /  2.9 (100.0) /  3.3 (100.0)
  multi5_permute 58.3 (98.8)  / 43.8 (98.8)  / 29.6 (98.3)
  gap            56.2 points  / 40.8 points  / 26.2 points
(session 18, before the fix: gaps 57.9 / 43.8 / 21.7.) The test asks for 15 points (at seed
0): below every seed's gap, far above none.
How it was chosen (session 18, on worlds the test never draws: seeds 10 / 11 / 12): the
session-12 setting, 32 x 128 positions a step (gaps 39.6 / 21.7 / 41.6 at seeds 0 / 1 / 2 and
50.0 at seed 10, ~165 s an arm), was a third of the default suite's CPU time; half the rows a
step gave gaps 33.8 / 43.8 / 39.2 on the tuning worlds in 100-106 s an arm, so the setting
halved its pretraining. Earlier findings that still hold: 300 steps at 32 rows gave gaps of
41.7 / 30.4 / 12.4 (the effect still forming); a narrower MLP (d_ff 256) narrowed the seed-2
gap to 18.3; smaller settings lose the effect before they lose storage: 100-150 people with
half of them finetuned on, or width 64, stored the bios (recall >= 99%) yet multi5_permute
reached only 8-10% held out; the number of QA-finetuned people is what the gap needs most
(150 people: 10% with half finetuned on, 27% with 80%).
"""

import json
import os
import shutil
import subprocess
import time

import runs

from kstore_jax import rundir

SEED = 0
MARGIN = 0.15          # points of held-out QA accuracy multi5_permute must lead single by
ARGS = [
    f"--config.seed={SEED}", "--config.data.n_people=200", "--config.data.qa_train_fraction=0.8",
    "--config.model.num_layers=2", "--config.model.d_model=128", "--config.model.num_heads=4",
    "--config.model.d_ff=512", "--config.pretrain.steps=400", "--config.pretrain.batch_size=16",
    "--config.pretrain.warmup_steps=40", "--config.pretrain.lr=5e-3",
    "--config.finetune.steps=100", "--config.train.log_every=20",
    "--config.train.save_every=10000",
    "--config.eval.max_people=40",   # all 40 held out; 40 of the 160 QA-trained (960 -> 240 q)
]
ROWS = ("single", "multi5_permute")
TIMEOUT = 900         # seconds for both arms, from the first one's start


def test_multi5_permute_beats_single_on_held_out_people(tmp_path, jax_cache):
  procs = {}
  cores = sorted(os.sched_getaffinity(0))
  deadline = time.time() + TIMEOUT
  for i, row in enumerate(ROWS):
    if i:   # the arms' programs are the same (only the data differs): the second one starts
      # once the first has compiled and logged its first row, and loads its executables
      # from the compilation cache instead (metrics.jsonl itself exists, empty, from the
      # stage's start: waiting for the file let the second arm compile everything beside
      # the first, 71.6 s of XLA compile measured)
      first = tmp_path / ROWS[0] / "pretrain" / "metrics.jsonl"
      while (not rundir.read_metrics(str(first)) and procs[ROWS[0]][1].poll() is None
             and time.time() < deadline):
        time.sleep(0.2)
    log = open(tmp_path / f"{row}.log", "w")   # a file, not a pipe: nobody reads it meanwhile
    # each arm on a core of its own (as the grid's processes mode runs them): two one-thread
    # processes instead of two two-thread ones contending for the same cores
    pin = ["taskset", "-c", str(cores[i % len(cores)])] if shutil.which("taskset") else []
    procs[row] = log, subprocess.Popen(
        [*pin, runs.python(), "-m", "kstore_jax.main", f"--config=configs/{row}.py:tiny",
         f"--workdir={tmp_path / row}", *ARGS], cwd=runs.ROOT,
        env=runs.env(jax_cache, optimize=True), stdout=log, stderr=subprocess.STDOUT)
  for row, (log, proc) in procs.items():
    rc = proc.wait(timeout=max(1.0, deadline - time.time()))
    log.close()
    assert rc == 0, f"{row}: exit {rc}\n{(tmp_path / f'{row}.log').read_text()[-3000:]}"
  res = {row: json.loads((tmp_path / row / "results.json").read_text()) for row in ROWS}
  for row, r in res.items():
    assert r["bio_recall"]["mean"] >= 0.95, (row, r["bio_recall"])   # both arms store...
    assert r["qa_train"]["mean"] >= 0.5, (row, r["qa_train"])        # ...and were finetuned
    assert r["qa_test_ci"]["mean"]["n"] == 240, r["qa_test_ci"]["mean"]
  single, multi = (res[row]["qa_test"]["mean"] for row in ROWS)
  assert single <= 0.10, single              # the single bio's facts are not extractable
  assert multi - single >= MARGIN, (multi, single)
