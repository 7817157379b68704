"""The QA split (data/world.py): the train/test split itself, and
data.qa_valid_fraction (issue 22 item 7): a slice of the QA-train people held back from
training for tuning. Off by default (the split is the old one); when set, the valid, test and
trained-on people are disjoint, of the stated sizes, the same for the same seed, the test
people are those of the default split, no training stream holds a valid person's QA, a bad
value is one line from configlib, and results.json reports `qa_valid` with its interval."""

import json

import numpy as np
import pytest
from runs import micro_stage_args, run_main

from configs import celeb_minority, single
from kstore_jax import configlib
from kstore_jax.data import sources, tokenizer, world as world_lib
from kstore_jax.tools import report


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train_tokenizer(1024)


def config(fraction, module=single, **data):
  c = module.get_config("tiny")
  c.data.qa_valid_fraction = fraction
  c.data.update(data)
  return c


def test_qa_train_split():
  """The train/test split alone: deterministic, of the stated size, spread over the ids."""
  for n, frac in ((200, 0.5), (101, 0.5), (200, 0.25), (10, 1.0), (10, 0.0)):
    a = world_lib.qa_train_split(7, n, frac)
    np.testing.assert_array_equal(a, world_lib.qa_train_split(7, n, frac))
    assert a.dtype == bool and a.shape == (n,)
    assert a.sum() == int(round(frac * n))
    train, test = np.flatnonzero(a), np.flatnonzero(~a)
    assert not set(train) & set(test) and len(train) + len(test) == n
  a, b = world_lib.qa_train_split(7, 200), world_lib.qa_train_split(8, 200)
  assert not np.array_equal(a, b)
  # Not a prefix split: the training people are spread over the population.
  assert 0 < a[:100].sum() < 100


def test_default_is_off(tok):
  """The default (0) holds nobody back: qa_train_split's train half, everyone else test."""
  c = single.get_config("tiny")
  assert c.data.qa_valid_fraction == 0.0
  w = world_lib.build_world(c, tok)
  np.testing.assert_array_equal(w.qa_train,
                                world_lib.qa_train_split(c.seed, c.data.n_people, 0.5))
  assert len(w.valid_people) == 0
  np.testing.assert_array_equal(w.test_people, np.flatnonzero(~w.qa_train))


@pytest.mark.parametrize("fraction, n_valid", [(0.2, 50), (0.5, 125), (0.01, 2)])
def test_three_disjoint_sets_of_the_stated_sizes(tok, fraction, n_valid):
  """500 people, qa_train_fraction 0.5: 250 test; of the 250 QA-train people,
  round(fraction * 250) valid, the rest trained on. Together: everyone once."""
  w = world_lib.build_world(config(fraction), tok)
  test, train, valid = (set(p.tolist()) for p in (w.test_people, w.train_people,
                                                   w.valid_people))
  assert (len(test), len(train), len(valid)) == (250, 250 - n_valid, n_valid)
  assert not test & train and not test & valid and not train & valid
  assert test | train | valid == set(range(500))
  default = world_lib.build_world(config(0.0), tok)
  np.testing.assert_array_equal(w.test_people, default.test_people)   # the same test people
  assert train | valid == set(default.train_people.tolist())


def test_same_seed_same_people(tok):
  a, b = (world_lib.build_world(config(0.2), tok) for _ in range(2))
  np.testing.assert_array_equal(a.valid_people, b.valid_people)
  np.testing.assert_array_equal(a.train_people, b.train_people)
  other = config(0.2)
  other.seed = 1
  c = world_lib.build_world(other, tok)
  assert len(c.valid_people) == 50
  assert set(c.valid_people.tolist()) != set(a.valid_people.tolist())


def test_groups_hold_back_their_own_qa_train_people(tok):
  """celeb_minority (500 minority, no QA training; 100 stars, half trained): the valid people
  are a share of the stars' QA-train half; the minority is all test, as without the key."""
  w = world_lib.build_world(config(0.4, celeb_minority), tok)
  default = world_lib.build_world(config(0.0, celeb_minority), tok)
  assert (len(w.train_people), len(w.valid_people)) == (30, 20)
  assert w.valid_people.min() >= 500
  np.testing.assert_array_equal(w.test_people, default.test_people)
  assert set(w.valid_people.tolist()) < set(default.train_people.tolist())


@pytest.mark.parametrize("stage", ["finetune", "pretrain_mixed"])
def test_no_training_stream_holds_a_valid_persons_qa(tok, stage):
  """The stage's QA source is the trained-on people's, and its documents over more than one
  pass of them come from exactly those people: no valid (or test) person's QA."""
  cfg = config(0.2)
  w = world_lib.build_world(cfg, tok)
  chunks = w.chunks(stage, cfg.data)
  qa_sources = [s for s in chunks.sources if isinstance(s, sources.QASource)]
  assert len(qa_sources) == 1
  assert qa_sources[0].people.tolist() == w.train_people.tolist()
  seen = set()
  for c in range(3):
    for k, idx in chunks.doc_refs(c):
      if chunks.sources[k] is qa_sources[0]:
        seen |= set(qa_sources[0].locate(idx)[0].tolist())
  assert seen == set(w.train_people.tolist())
  assert not seen & set(w.valid_people.tolist())


@pytest.mark.parametrize("fraction", [1.0, -0.1, 0.999])
def test_bad_fraction_is_one_line(fraction):
  """Out of [0, 1), or leaving nobody's QA trained on (0.999 of 250 rounds to all 250)."""
  with pytest.raises(configlib.ConfigError) as e:
    configlib.validate(config(fraction), 1, "cpu")
  msg = str(e.value)
  assert f"data.qa_valid_fraction={fraction}" in msg and "\n" not in msg
  assert ("leaves nobody" in msg) if 0 <= fraction < 1 else ("must be in [0, 1)" in msg), msg
  configlib.validate(config(0.99), 1, "cpu")      # 248 of 250: 2 people still trained on


def test_results_json_has_qa_valid(tmp_path, jax_cache):
  """60 people: 30 test, 30 QA-train of which round(0.2 * 30) = 6 valid, 24 trained on."""
  wd = tmp_path / "run"
  args = ["--config=configs/single.py:tiny", f"--workdir={wd}", "--config.data.n_people=60",
          "--config.data.qa_valid_fraction=0.2",
          *micro_stage_args(4, 10, pretrain=6, finetune=4)]
  r = run_main(args, jax_cache, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  assert res["produced_by"]["qa_valid"] == res["produced_by"]["qa_valid_ci"] == "eval"
  assert set(res["qa_valid"]) == set(res["qa_test"])
  for key, people in (("qa_test", 30), ("qa_train", 24), ("qa_valid", 6)):
    ci = res[key + "_ci"]["mean"]
    assert ci["n"] == 6 * people, key
    assert ci["lo"] <= res[key]["mean"] <= ci["hi"], key
  assert " valid " in r.stdout
  md, _ = report.build_report([str(wd)], str(tmp_path / "report.md"))
  assert "| QA valid |" in md
  ci = res["qa_valid_ci"]["mean"]
  assert f"| {100 * res['qa_valid']['mean']:.1f} [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}] |" \
      in md
