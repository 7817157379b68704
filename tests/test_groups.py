"""Groups in one population (data.groups; configs/celeb_minority.py, configs/minority_only.py):
exact people shares, token shares of the pretraining stream, per-group bios, the control's
identical minority, QA training only on the celebrities' train half, validation errors, and
results.json / report per group from a tiny end-to-end run."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
from runs import micro_stage_args, run_main

from configs import base, celeb_minority, minority_only, single_permute1
from kstore_jax import configlib
from kstore_jax.data import population, render, tokenizer, world as world_lib
from kstore_jax.tools import report

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train_tokenizer(1024)


def grouped(module=celeb_minority, scale="tiny", **changes):
  c = module.get_config(scale)
  for path, value in changes.items():
    name, key = path.split("__")
    c.data.groups[name][key] = value
  return c


def positions(world, src, idx) -> np.ndarray:
  """Positions (tokens - 1) of documents idx of a bio or QA source, from piece lengths."""
  pieces = src.pieces(idx)
  pieces = pieces[0] if isinstance(pieces, tuple) else pieces
  return world.renderer.piece_len[pieces].sum(1) - 1


# -- people and tokens --------------------------------------------------------------------
@pytest.mark.parametrize("scale, n_minority, n_star", [("tiny", 500, 100), ("small", 2000, 400),
                                                       ("paper", 100_000, 20_000)])
def test_people_shares_are_exact(scale, n_minority, n_star):
  minority, star = world_lib.make_groups(celeb_minority.get_config(scale).data)
  assert (minority.name, minority.start, minority.stop) == ("minority", 0, n_minority)
  assert (star.name, star.start, star.stop) == ("star", n_minority, n_minority + n_star)
  # Any shares: contiguous, covering, each within one person of its share.
  shares = [0.13, 0.3, 0.57]
  bounds = world_lib.group_bounds(shares, 1001)
  assert bounds[0] == 0 and bounds[-1] == 1001 and (np.diff(bounds) > 0).all()
  assert np.abs(np.diff(bounds) - np.array(shares) * 1001).max() <= 0.5


@pytest.mark.parametrize("tokens, fullname", [(0.5, False), (0.2, True)])
def test_token_shares_of_the_stream(tok, tokens, fullname):
  """Each group's share of the bio positions over a long pretraining stream is its `tokens`
  (within 1%), although bios of the two groups differ in length (fullname is longer)."""
  cfg = grouped(star__tokens=tokens, minority__tokens=1 - tokens, star__fullname=fullname)
  w = world_lib.build_world(cfg, tok)
  chunks = w.chunks("pretrain", cfg.data)
  got = np.zeros(len(w.groups))
  docs = np.zeros(len(w.groups))
  for c in range(300):   # 300 x 1024 documents: ~300 epochs of the star bios
    for k, idx in chunks.doc_refs(c):
      got[k] += positions(w, chunks.sources[k], idx).sum()
      docs[k] += len(idx)
  share = got / got.sum()
  np.testing.assert_allclose(share, [1 - tokens, tokens], rtol=0.01)
  if fullname:   # weighting documents by `tokens` alone would miss by far more than 1%
    assert abs(docs[1] / docs.sum() - tokens) > 0.02


def test_mixed_stage_keeps_token_shares_and_qa_ratio(tok):
  cfg = grouped(star__tokens=0.3, minority__tokens=0.7)
  w = world_lib.build_world(cfg, tok)
  srcs, weights = w.stage_mixture("pretrain_mixed", cfg.data)
  bios, bio_weights = w.bio_mixture()
  assert srcs[-1].people.tolist() == w.train_people.tolist()
  np.testing.assert_allclose(weights, [*(0.2 * np.array(bio_weights)), 0.8])


def test_a_token_share_under_one_document_per_chunk_is_refused(tok):
  """A chunk takes round(weight x data.chunk_docs) documents of each source: a group whose
  bios' weight in a stage's stream is under one document per chunk would never be read.
  0.2% of the bio positions is ~2 of 1024 documents in pretrain, ~0.4 in pretrain_mixed (where
  the bios have 1 - data.qa_ratio = 20% of the documents)."""
  cfg = grouped(star__tokens=0.002, minority__tokens=0.998)
  star = world_lib.build_world(cfg, tok).chunks("pretrain", cfg.data).counts[1]
  assert star == 2
  cfg = grouped(scale="tiny,mixed", star__tokens=0.002, minority__tokens=0.998)
  with pytest.raises(configlib.ConfigError, match=r"^data.groups.star.tokens=0.002: a "
                     r"pretrain_mixed chunk of data.chunk_docs=1024 documents would hold 0.4\d* "
                     r"of its bios, i.e. none"):
    world_lib.build_world(cfg, tok)


def test_no_groups_is_the_single_world(tok):
  """Without data.groups: the NumPy-stream population, the old QA split, one bio source."""
  cfg = single_permute1.get_config("tiny")
  w = world_lib.build_world(cfg, tok)
  old = population.make_population(0, 500)
  assert all((getattr(w.pop, f) == getattr(old, f)).all() for f in ("first", "last", "major"))
  np.testing.assert_array_equal(w.qa_train, world_lib.qa_train_split(0, 500, 0.5))
  srcs, weights = w.stage_mixture("pretrain", cfg.data)
  assert weights == [1.0] and len(srcs) == 1 and srcs[0].people.tolist() == list(range(500))
  assert w.aug == render.AugSpec(permute=True)


# -- bios per group, the control ----------------------------------------------------------
def test_each_group_writes_its_own_bios(tok):
  w = world_lib.build_world(celeb_minority.get_config("tiny"), tok)
  minority, star = w.groups
  for g, copies in ((minority, 1), (star, 5)):
    src = w.group_bios(g)
    assert len(src) == copies * (g.stop - g.start)
    docs = src.docs(np.arange(copies * 20))                      # the first 20 people
    texts = [tuple(docs.doc(i)["tokens"]) for i in range(len(docs))]
    per_person = [len(set(texts[p * copies:(p + 1) * copies])) for p in range(20)]
    assert per_person == [copies] * 20
    _, order = src.pieces(np.arange(copies * 20))
    assert (order != np.arange(6)).any(1).mean() > 0.8           # permuted sentence orders
  # bio_docs renders each person with their group's spec: a star's copy 0 is a star bio.
  docs, spans = w.bio_docs([3, star.start + 2], [0, 0])
  for i, (g, index) in enumerate(((minority, 3), (star, 10))):
    np.testing.assert_array_equal(docs.doc(i)["tokens"], w.group_bios(g).docs([index]).tokens)
    np.testing.assert_array_equal(spans[i], w.group_bios(g).spans([index])[0])
  with pytest.raises(ValueError, match="data.groups"):
    w.aug
  # people of one group only (an eval sample of 10 spread over the test people never reached
  # a star: bio recall crashed rendering the stars' empty share)
  only, only_spans = w.bio_docs([3, 7], [0, 0])
  np.testing.assert_array_equal(only.tokens, w.group_bios(minority).docs([3, 7]).tokens)
  np.testing.assert_array_equal(only_spans, w.group_bios(minority).spans([3, 7]))


def test_control_has_the_same_minority(tok):
  with_stars = world_lib.build_world(celeb_minority.get_config("tiny"), tok)
  control = world_lib.build_world(minority_only.get_config("tiny"), tok)
  (g,) = control.groups
  assert (g.name, g.start, g.stop) == ("minority", 0, 500) == (
      with_stars.groups[0].name, with_stars.groups[0].start, with_stars.groups[0].stop)
  for f in ("first", "middle", "last", "gender", "birth_year", "birth_city", "company"):
    np.testing.assert_array_equal(getattr(control.pop, f), getattr(with_stars.pop, f)[:500])
  a = control.group_bios(g).docs(np.arange(500))
  b = with_stars.group_bios(with_stars.groups[0]).docs(np.arange(500))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  # The control trains QA on half its minority; with stars, no minority QA is trained.
  assert control.qa_train.sum() == 250 and not with_stars.qa_train[:500].any()
  names = {control.pop.full_name(i) for i in range(500)}
  assert len(names) == 500 and with_stars.pop.full_name(550) not in names


def test_qa_training_only_from_the_stars_train_half(tok):
  cfg = celeb_minority.get_config("tiny")
  w = world_lib.build_world(cfg, tok)
  minority, star = w.groups
  train = set(w.train_people.tolist())
  assert len(train) == 50 and train <= set(range(star.start, star.stop))
  assert set(w.test_people.tolist()) == set(range(500)) | (set(range(500, 600)) - train)
  chunks = w.chunks("finetune", cfg.data)
  seen = set()
  for c in range(3):
    for k, idx in chunks.doc_refs(c):
      seen |= set(chunks.sources[k].locate(idx)[0].tolist())
  assert seen == train


def test_scores_split_by_group(tok):
  """qa_eval.by_group assigns each answer to its person's group (qa_correct order)."""
  from kstore_jax import experiment
  from kstore_jax.eval import qa_eval
  w = world_lib.build_world(celeb_minority.get_config("tiny"), tok)
  people = w.test_people[::7]
  _, _, _, _, attrs = qa_eval.qa_arrays(w, people)
  person = np.repeat(people, 6)
  correct = (person >= 500) & (attrs != 2)       # stars right except on attribute 2
  got = experiment.group_results(w.groups, {
      "qa_test": qa_eval.by_group(w.groups, people, correct, attrs)})
  assert got["minority"] == {"people": 500, "qa_test": qa_eval.per_attribute(
      np.zeros(6 * (people < 500).sum(), bool), attrs[person < 500])}
  assert got["minority"]["qa_test"]["mean"] == 0.0
  assert got["star"]["qa_test"]["university"] == 0.0
  assert got["star"]["qa_test"]["major"] == 1.0 and got["star"]["people"] == 100


def test_eval_max_people_samples_every_group(tok, tmp_path):
  """Groups are contiguous id ranges: the first eval.max_people held-out people would all be
  minority (ids 0..499), and the stars' row would read "no held-out people"."""
  from kstore_jax import experiment
  cfg = celeb_minority.get_config("tiny")
  cfg.eval.max_people = 30
  exp, _ = experiment.open_experiment(cfg, str(tmp_path / "run"), 1, "cpu")
  w = exp.world
  for part, people in exp.eval_parts().items():
    everyone = w.test_people if part == "qa_test" else w.train_people
    assert len(people) == 30 and len(set(people.tolist())) == 30
    assert set(people.tolist()) <= set(everyone.tolist())
    star = int((w.group_of(people) == 1).sum())
    share = (w.group_of(everyone) == 1).mean()
    assert abs(star - 30 * share) <= 1, (part, star, share)   # each group its share
  assert not (tmp_path / "run").exists()


# -- validation -----------------------------------------------------------------------------
def _bad_type(c):
  c.data.groups.star = base.group(1 / 6, 0.5, 0.5, multi=2.5)


def _unknown_key(c):
  c.data.groups.star.multy = 5


def _not_a_section(c):
  c.data.groups = ml_collections.ConfigDict(dict(star=0.5), type_safe=False)


BAD = {
    "unknown_key": (_unknown_key, "data.groups.star.multy"),
    "not_a_section": (_not_a_section, "data.groups.star"),
    "people_sum": (dict(star__people=0.3), "data.groups: the people shares sum to 1.13333"),
    "tokens_sum": (dict(star__tokens=0.4), "data.groups: the tokens shares sum to 0.9"),
    "empty_group": (dict(star__people=0.0005, minority__people=0.9995),
                    "data.groups.star.people=0.0005 gives no person"),
    "bad_type": (_bad_type, "data.groups.star.multi=2.5"),
    "share_range": (dict(star__tokens=1.5, minority__tokens=-0.5), "data.groups.minority.tokens"),
    "no_qa_training": (dict(star__qa_train_fraction=0.0), "qa_train_fraction"),
    "permute_copies": (dict(minority__permute_copies=2, minority__permute=False),
                       "data.groups.minority.permute_copies > 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_group_config_is_one_line_naming_the_key(case):
  change, message = BAD[case]
  if callable(change):
    cfg = celeb_minority.get_config("tiny")
    change(cfg)
  else:
    cfg = grouped(**change)
  with pytest.raises(configlib.ConfigError) as e:
    configlib.validate(cfg, 1)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_pprobe_needs_one_augmentation():
  cfg = celeb_minority.get_config("tiny,probe")
  with pytest.raises(configlib.ConfigError, match="pprobe"):
    configlib.validate(cfg, 1)


# -- end to end -----------------------------------------------------------------------------
def test_results_and_report_per_group(tmp_path, jax_cache):
  """celeb_minority at 120 people (100 minority, 20 stars), a few steps of each stage."""
  wd = tmp_path / "celeb_minority"
  args = ["--config=configs/celeb_minority.py:tiny", f"--workdir={wd}",
          "--config.data.n_people=120", "--config.data.seq_len=160",
          "--config.data.vocab_size=1024", *micro_stage_args(8, 2, pretrain=2, finetune=2)]
  r = run_main(args, jax_cache, timeout=240)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((wd / "results.json").read_text())
  assert {"qa_test", "qa_train", "bio_recall"} <= set(results)
  groups = results["groups"]
  assert set(groups) == {"minority", "star"}
  assert groups["minority"]["people"] == 100 and groups["star"]["people"] == 20
  assert "qa_train" not in groups["minority"]            # no minority QA is ever trained on
  people = {"minority": {"qa_test": 100}, "star": {"qa_test": 10, "qa_train": 10}}
  for name, parts in (("minority", ("qa_test",)), ("star", ("qa_test", "qa_train"))):
    for part in parts:
      assert set(groups[name][part]) == {*report.ATTR_SHORT, "mean"}
      ci = groups[name][part + "_ci"]                 # the 95% intervals (test_intervals.py)
      assert set(ci) == {*report.ATTR_SHORT, "mean"}
      assert ci["mean"]["n"] == 6 * people[name][part]
      assert ci["mean"]["lo"] <= groups[name][part]["mean"] <= ci["mean"]["hi"]
  md, _ = report.build_report([str(wd)], str(tmp_path / "report.md"))
  row = next(line for line in md.splitlines() if line.startswith("| `celeb_minority` | finetune"
                                                                  " | ") and "(86.8)" in line)
  ci = groups["minority"]["qa_test_ci"]["mean"]
  assert (f"{100 * groups['minority']['qa_test']['mean']:.1f} [{100 * ci['lo']:.1f}, "
          f"{100 * ci['hi']:.1f}] (86.8)") in row
