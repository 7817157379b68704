"""95% Wilson score intervals (issue 22 item 7): `qa_eval.wilson` against hand-computed values
and the closed form, the pooled interval of a mean over attributes (clustered by person,
checked against a written-out cluster-robust variance and by its coverage in simulation),
the report's `56.7 [54.2, 59.1]` cells. The end-to-end check (a run's results.json has an interval, a
`<key>_ci` sibling, for every accuracy, each containing it) is in test_tools.py, on the probe
run it shares with the results.json tests there."""

import json
import math

import numpy as np
import pytest

from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.eval import qa_eval
from kstore_jax.tools import report

Z = 1.959964


# -- the interval ----------------------------------------------------------------------------
# Worked by hand with z² = 1.959964² = 3.8414588:
#   0/10:  lo 0, hi = z²/(n + z²) = 3.8414588 / 13.8414588 = 0.2775328
#   10/10: lo = n/(n + z²) = 10 / 13.8414588 = 0.7224672, hi 1
#   5/10:  0.5 ± z·sqrt(0.025 + z²/400) / (1 + z²/10) = 0.5 ± 0.2634069
#   1/1500: (1/1500 + z²/3000 ± z·sqrt((1/1500)(1499/1500)/1500 + z²/(4·1500²))) / (1 + z²/1500)
#           = (0.0019471 ± 0.0018294) / 1.0025610 = 0.0001177, 0.0037667
HAND = {(0, 10): (0.0, 0.2775328), (10, 10): (0.7224672, 1.0), (5, 10): (0.2365931, 0.7634069),
        (1, 1500): (0.0001177, 0.0037667)}


@pytest.mark.parametrize("k, n", sorted(HAND))
def test_wilson_hand_values(k, n):
  lo, hi = qa_eval.wilson(k, n)
  assert lo == pytest.approx(HAND[k, n][0], abs=1e-7)
  assert hi == pytest.approx(HAND[k, n][1], abs=1e-7)
  assert qa_eval.interval(k, n) == {"lo": lo, "hi": hi, "n": n}


def closed_form(k, n, z=Z):
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (3, 7), (340, 600), (1499, 1500), (1, 3000),
                                  (2987, 3000)])
def test_wilson_is_the_closed_form_and_the_score_test_bounds(k, n):
  """The formula with z = 1.959964, and the same bounds as the roots of the score test's
  quadratic (p̂ - x)² = z² x (1 - x) / n; the interval contains p̂."""
  lo, hi = qa_eval.wilson(k, n)
  assert (lo, hi) == pytest.approx(closed_form(k, n), abs=1e-12)
  p, z2 = k / n, Z * Z
  roots = np.sort(np.roots([1 + z2 / n, -(2 * p + z2 / n), p * p]).real)
  assert (lo, hi) == pytest.approx(tuple(roots), abs=1e-9)
  assert 0.0 <= lo <= p <= hi <= 1.0


def test_wilson_of_no_examples_is_everything():
  assert qa_eval.wilson(0, 0) == (0.0, 1.0)


def cluster_robust_n_eff(correct, persons) -> float:
  """The reference: p(1-p) over the cluster-robust (CR1) variance of a pooled mean, written
  out person by person."""
  correct, n = np.asarray(correct, float), len(correct)
  p = correct.mean()
  people = sorted(set(persons))
  dev = [sum(c - p for c, q in zip(correct, persons) if q == who) for who in people]
  v = sum(d * d for d in dev) / n ** 2 * len(people) / (len(people) - 1)
  return min(n, p * (1 - p) / v)


def test_mean_interval_counts_a_persons_answers_as_one_cluster():
  """Ten people × six attributes, person i right on attributes < i % 7: each attribute's
  interval is Wilson over its 10 people; the mean's is Wilson at the cluster-robust effective
  count (between the 10 people and the 60 questions), not Wilson over 60 independent ones."""
  persons = np.repeat(np.arange(10), 6)
  attrs = np.tile(np.arange(6), 10)
  correct = attrs < persons % 7
  ci = qa_eval.per_attribute_ci(correct, attrs, persons)
  assert set(ci) == set(qa_eval.per_attribute(correct, attrs))
  for a, name in enumerate(ATTRIBUTES):
    assert ci[name] == qa_eval.interval(correct[attrs == a].sum(), 10)
  n_eff = cluster_robust_n_eff(correct, persons)
  assert 10 < n_eff < 60
  p = correct.mean()
  assert ci["mean"] == pytest.approx({"lo": qa_eval.wilson(p * n_eff, n_eff)[0],
                                      "hi": qa_eval.wilson(p * n_eff, n_eff)[1], "n": 60,
                                      "n_eff": n_eff})
  # qa_correct's person-major order is the default
  assert qa_eval.per_attribute_ci(correct, attrs) == ci
  assert qa_eval.scored("x", correct, attrs) == {"x": qa_eval.per_attribute(correct, attrs),
                                                 "x_ci": ci}
  # every answer alike: the questions' count, the estimate's limit as the errors thin out,
  # so a perfect score's lower bound is above one error's (2 people of 6 questions)
  two = np.repeat([0, 1], 6)
  perfect = qa_eval.pooled_interval(np.ones(12, bool), two)
  one_wrong = qa_eval.pooled_interval(np.arange(12) > 0, two)
  assert perfect["n_eff"] == 12 and (perfect["lo"], perfect["hi"]) == qa_eval.wilson(12, 12)
  assert perfect["lo"] > one_wrong["lo"], (perfect, one_wrong)
  # one person: no spread between people to estimate, as wide as one observation
  alone = qa_eval.pooled_interval(np.arange(6) > 0, np.zeros(6, int))
  assert alone["n_eff"] == 1 and (alone["lo"], alone["hi"]) == qa_eval.wilson(5 / 6, 1)


@pytest.mark.parametrize("alike", [0.0, 1.0])
def test_pooled_interval_covers_the_true_accuracy(alike):
  """1,000 simulated evals of 250 people × 6 answers at a true accuracy of 0.55, a person's six
  answers one coin flip with probability `alike` (else six independent ones): the pooled
  interval covers 0.55 in ~95% of them either way (Wilson over the 1,500 questions as if
  independent: 54% at alike = 1, measured by the review that found it)."""
  rng = np.random.default_rng(0)
  persons = np.repeat(np.arange(250), 6)
  covered = 0
  for _ in range(1000):
    shared = rng.random(250) < alike
    one = np.repeat(rng.random(250) < 0.55, 6)
    own = rng.random(1500) < 0.55
    correct = np.where(np.repeat(shared, 6), one, own)
    ci = qa_eval.pooled_interval(correct, persons)
    covered += ci["lo"] <= 0.55 <= ci["hi"]
  assert 0.93 <= covered / 1000 <= 0.97, covered


def test_token_split_intervals_count_each_kind():
  """by_answer_tokens_ci: the keys of by_answer_tokens less multi_share, each single / multi
  interval over the answers of that kind; over all attributes clustered by person."""
  attrs = np.array([0, 0, 0, 1, 1, 1])
  alens = np.array([3, 4, 2, 2, 2, 3])      # value tokens + EOT: multi, multi, single, ...
  correct = np.array([True, False, True, True, False, False])
  persons = np.array([0, 1, 2, 0, 1, 2])
  ci = qa_eval.by_answer_tokens_ci(correct, attrs, alens, persons)
  acc = qa_eval.by_answer_tokens(correct, attrs, alens)
  assert set(ci) == set(acc)
  for key in ci:
    assert set(ci[key]) == set(acc[key]) - {"multi_share"}
  assert ci[ATTRIBUTES[0]] == {"single": qa_eval.interval(1, 1), "multi": qa_eval.interval(1, 2)}
  single, multi = np.array([2, 3, 4]), np.array([0, 1, 5])      # the kinds' questions
  for kind, idx in (("single", single), ("multi", multi)):
    n_eff = cluster_robust_n_eff(correct[idx], persons[idx])
    k = correct[idx].mean() * n_eff
    assert ci["all"][kind] == pytest.approx({"lo": qa_eval.wilson(k, n_eff)[0],
                                             "hi": qa_eval.wilson(k, n_eff)[1], "n": 3,
                                             "n_eff": n_eff})


# -- the report ------------------------------------------------------------------------------
def test_report_prints_intervals(tmp_path):
  """`56.7 [54.2, 59.1]` wherever results.json has the `_ci` sibling; a run without one keeps
  the plain number."""
  accs = {**{a: 0.5 for a in ATTRIBUTES}, "mean": 0.567}
  ci = {**{a: {"lo": 0.4, "hi": 0.6, "n": 250} for a in ATTRIBUTES},
        "mean": {"lo": 0.542, "hi": 0.591, "n": 1500}}
  for name, extra in (("multi5_permute", {"qa_test_ci": ci}), ("single", {})):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"name": name, "stages": ["pretrain", "finetune",
                                                                        "eval"]}))
    (d / "results.json").write_text(json.dumps({"qa_test": accs, "qa_train": accs,
                                                "bio_recall": accs, **extra}))
  text, _ = report.build_report([str(tmp_path / n) for n in ("multi5_permute", "single")],
                                str(tmp_path / "out" / "report.md"))
  lines = text.splitlines()
  assert "| `multi5_permute` | 56.7 [54.2, 59.1] (96.6) | — (—) |" in lines
  assert "| `single` | 56.7 (9.7) | — (86.6) |" in lines
  detail = next(l for l in lines if l.startswith("| `multi5_permute` | finetune |"))
  assert "| 56.7 [54.2, 59.1] (96.6) | 50.0 [40.0, 60.0] |" in detail
  assert "| 56.7 | 56.7 |" in detail        # train half and bio recall: no intervals recorded


def test_ci_bounds_reads_only_a_whole_interval_leaf():
  """rundir.ci_bounds, the one reader of a `<key>_ci` leaf (report's cells and chart, inspect's
  results line): (lo, hi) when both are numbers, else None."""
  from kstore_jax import rundir
  assert rundir.ci_bounds({"lo": 0.481, "hi": 0.543, "n": 1500}) == (0.481, 0.543)
  for not_a_leaf in (None, {}, {"lo": 0.481}, {"lo": None, "hi": 0.5}, [0.4, 0.5]):
    assert rundir.ci_bounds(not_a_leaf) is None
