"""Exact-match QA accuracy (KV-cache greedy generation; mask filling for a bidirectional model)
and the bio-recall storage check; 95% Wilson score intervals of accuracies.

results.json: every accuracy entry `key` (a dict of accuracies, or a matrix) has a sibling
`key + CI` ("qa_test_ci") of the same shape whose leaves are `{"lo", "hi", "n"}`: the 95%
Wilson score interval of that accuracy over its n examples. An accuracy pooled over several
attributes (a "mean", the token split's "all") counts a person's answers as one cluster: they
are not independent (a person's facts tend to be stored, or not, together, and company city
follows from company), so its interval is Wilson's at the effective number of questions and
its leaf adds "n_eff" (`pooled_interval`). The accuracies themselves stay plain numbers."""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kstore_jax.data.render import N_ATTR, QA_NAME_SLOTS, QA_VALUE_SLOTS
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.data.tokenizer import MASK
from kstore_jax.data.world import group_index
from kstore_jax.eval.generate import Prefixes, fill_masks, generate, greedy, over_runs
from kstore_jax.model.transformer import forward_flops
from kstore_jax.rundir import CI   # results.json: key + CI holds the intervals of key's accuracies


# What compiling the decoder for one more batch shape costs, in FLOPs of decoding it could
# have run instead: on a 2-core CPU ~5 s to compile `generate` at `tiny` against ~55 GFLOP/s
# of decoding, ~6.5 s at `small` against ~59 (BENCHMARKS.md, "QA eval's batch shapes"). An
# accelerator compiles in seconds too but decodes orders of magnitude faster (not measured:
# taken as 100x the CPU's, at least 10x short of an H200's bf16 rate against a 2-core CPU's),
# so there a `small` eval's 12,000 questions decode in one shape instead of three.
COMPILE_FLOPS = {"cpu": 3e11}
ACCELERATOR_COMPILE_FLOPS = 3e13


class QASet(NamedTuple):
  """QA questions split where every person's question is the same: `prefix_AS` [A, S] (EOT and
  the question's words before the name, one row per attribute, right-padded, `prefix_lens_A`)
  and each question's own rest `rest_NR` (the name and the words after it, `rest_lens_N`);
  question i is prefix attrs_N[i] followed by its rest. Answers [N, W] are value + EOT."""
  prefix_AS: np.ndarray
  prefix_lens_A: np.ndarray
  rest_NR: np.ndarray
  rest_lens_N: np.ndarray
  answers_NW: np.ndarray
  alens_N: np.ndarray
  attrs_N: np.ndarray

  def take(self, idx, width: int | None = None) -> "QASet":
    """Questions idx, the rest trimmed to `width` (at least their longest; default that)."""
    width = width or int(self.rest_lens_N[idx].max())
    return self._replace(rest_NR=self.rest_NR[idx, :width], rest_lens_N=self.rest_lens_N[idx],
                         answers_NW=self.answers_NW[idx], alens_N=self.alens_N[idx],
                         attrs_N=self.attrs_N[idx])

  @property
  def prompt_lens_N(self) -> np.ndarray:
    """Whole question lengths (prefix + rest)."""
    return self.prefix_lens_A[self.attrs_N] + self.rest_lens_N

  def prefixes(self) -> Prefixes:
    """The shared prefixes as `generate` takes them (row i starts with prefix attrs_N[i])."""
    return Prefixes(*map(jnp.asarray, (self.prefix_AS, self.prefix_lens_A, self.attrs_N)))

  def prompts(self, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole questions [N, P] right-padded with pad_id, and their lengths."""
    pl_N1 = self.prefix_lens_A[self.attrs_N][:, None]
    lens_N = self.prompt_lens_N
    cols_P = np.arange(lens_N.max())
    head = self.prefix_AS[self.attrs_N[:, None], np.minimum(cols_P, self.prefix_AS.shape[1] - 1)]
    tail = np.take_along_axis(self.rest_NR, np.clip(cols_P - pl_N1, 0,
                                                     self.rest_NR.shape[1] - 1), 1)
    out = np.where(cols_P < pl_N1, head, np.where(cols_P < lens_N[:, None], tail, pad_id))
    return out.astype(self.rest_NR.dtype), lens_N


def qa_set(world, people) -> QASet:
  """The QA of `people` (N_ATTR questions per person, person-major) as a QASet."""
  qa = world.qa(people)
  pieces = qa.pieces(np.arange(len(qa)))
  r = world.renderer
  render = lambda p: r.render(p, np.zeros(p.shape[1], bool)).padded(world.pad_id)
  name_at = QA_NAME_SLOTS.start   # prefix: EOT + the question's words before the name
  _, attrs = qa.locate(np.arange(len(qa)))
  by_attr = np.full(N_ATTR, -1)
  by_attr[attrs] = np.arange(len(attrs))     # one question per attribute present
  present = by_attr >= 0
  prefix, prefix_lens = render(pieces[by_attr[present], :name_at])
  prefix_AS = np.zeros((N_ATTR, prefix.shape[1]), prefix.dtype)
  prefix_lens_A = np.zeros(N_ATTR, prefix_lens.dtype)
  prefix_AS[present], prefix_lens_A[present] = prefix, prefix_lens
  return QASet(prefix_AS, prefix_lens_A, *render(pieces[:, name_at:QA_VALUE_SLOTS.start]),
               *render(pieces[:, QA_VALUE_SLOTS]), attrs)


def qa_arrays(world, people):
  """Whole prompts [n, P], prompt lengths, answers [n, W] (value + EOT), answer lengths,
  attributes."""
  s = qa_set(world, people)
  return (*s.prompts(world.pad_id), s.answers_NW, s.alens_N, s.attrs_N)


def _batches(n: int, batch_size: int):
  """Fixed-size index batches (the last one padded by repeating index 0) and their counts."""
  for s in range(0, n, batch_size):
    idx = np.arange(s, min(s + batch_size, n))
    yield np.concatenate([idx, np.zeros(batch_size - len(idx), np.int64)]), len(idx)


def per_attribute(correct: np.ndarray, attrs: np.ndarray) -> dict[str, float]:
  out = {a: float(correct[attrs == i].mean()) for i, a in enumerate(ATTRIBUTES)
         if (attrs == i).any()}
  out["mean"] = float(np.mean(list(out.values()))) if out else 0.0
  return out


Z95 = 1.959964      # the standard normal's 97.5% quantile: two-sided 95%


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
  """The Wilson score interval (lo, hi) of k successes in n trials (z = 1.959964: 95%):
  (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n) with p = k/n; exactly 0 / 1 at
  k = 0 / n (where the formula's bound is 0 / 1 up to rounding); (0, 1) for n = 0."""
  if n <= 0:
    return 0.0, 1.0
  p, z2 = k / n, z * z
  centre = p + z2 / (2 * n)
  half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n))
  lo = 0.0 if k <= 0 else max(0.0, (centre - half) / (1 + z2 / n))
  hi = 1.0 if k >= n else min(1.0, (centre + half) / (1 + z2 / n))
  return lo, hi


def interval(k: float, n: int) -> dict:
  """results.json's interval leaf: {"lo", "hi", "n"} of k right out of n."""
  lo, hi = wilson(float(k), int(n))
  return {"lo": lo, "hi": hi, "n": int(n)}


def pooled_interval(correct: np.ndarray, persons: np.ndarray) -> dict:
  """The interval leaf of an accuracy pooled over questions that come in clusters (`persons`:
  each question's person): Wilson's interval at n_eff = p(1 - p) / v questions, v the
  cluster-robust variance of the pooled accuracy p (sum over people of (k_c - p m_c)², over
  n², times G / (G - 1) for G people), at most n. Independent answers give n_eff ~ n (Wilson
  over the questions); each person all right or all wrong gives n_eff ~ the number of people.
  With every answer alike (p = 0 or 1) n_eff is n, the limit of the estimate as the errors
  (or right answers) thin out (the fully correlated count there put a perfect score's lower
  bound below one error's); with one person there is no spread to estimate, and n_eff is 1."""
  correct = np.asarray(correct, np.float64)
  n = correct.size
  if n == 0:
    return {**interval(0, 0), "n_eff": 0.0}
  _, cluster = np.unique(np.asarray(persons), return_inverse=True)
  g, p = int(cluster.max()) + 1, correct.mean()
  resid = np.bincount(cluster, correct - p)
  v = float((resid ** 2).sum()) / (n * n) * g / max(g - 1, 1)
  n_eff = 1.0 if g == 1 else min(float(n), p * (1 - p) / v) if v > 0 else float(n)
  lo, hi = wilson(p * n_eff, n_eff)
  return {"lo": lo, "hi": hi, "n": int(n), "n_eff": n_eff}


def people_interval(acc: float, people: int, per_person: int = N_ATTR) -> dict:
  """The interval leaf of an accuracy pooled over `per_person` answers of each of `people`
  people when only the accuracy is known (a probe's per-attribute means): as if each person's
  answers were alike (n_eff = people), the widest pooled_interval gives."""
  lo, hi = wilson(float(acc) * people, people)
  return {"lo": lo, "hi": hi, "n": int(people * per_person), "n_eff": float(people)}


def person_of(n_questions: int) -> np.ndarray:
  """Each question's person (an index) in qa_correct's and bio_recall_correct's person-major
  order (N_ATTR questions per person)."""
  if n_questions % N_ATTR:
    raise ValueError(f"{n_questions} questions are not {N_ATTR} per person")
  return np.arange(n_questions) // N_ATTR


def accuracy_interval(acc: float, n: int) -> dict:
  """interval() of an accuracy over n examples given as a fraction (probe accuracies)."""
  return interval(round(float(acc) * n), n)


def per_attribute_ci(correct: np.ndarray, attrs: np.ndarray,
                     persons: np.ndarray | None = None) -> dict[str, dict]:
  """per_attribute's intervals: the same keys, each {"lo", "hi", "n"}; "mean" over the pooled
  questions (every attribute's), clustered by `persons` (each question's person; default:
  qa_correct's person-major order, `person_of`): `pooled_interval`."""
  correct = np.asarray(correct, bool)
  persons = person_of(correct.size) if persons is None else persons
  out = {a: interval(correct[attrs == i].sum(), (attrs == i).sum())
         for i, a in enumerate(ATTRIBUTES) if (attrs == i).any()}
  out["mean"] = pooled_interval(correct, persons)
  return out


def scored(key: str, correct: np.ndarray, attrs: np.ndarray) -> dict[str, dict]:
  """{key: per_attribute, key + CI: per_attribute_ci}: a results.json entry and its intervals
  (correct and attrs person-major, N_ATTR per person: qa_correct, bio_recall_correct)."""
  return {key: per_attribute(correct, attrs), key + CI: per_attribute_ci(correct, attrs)}


def answers_match(generated_BW: np.ndarray, answers_BW: np.ndarray, alens_B: np.ndarray):
  """Exact match of every answer token, the closing EOT included ([B]; [R, B] for several
  runs' answers [R, B, W])."""
  width = answers_BW.shape[1]
  valid = np.arange(width)[None] < alens_B[:, None]
  return ((generated_BW[..., :width] == answers_BW) | ~valid).all(-1)


def answer(model, params, world, qs: QASet, max_new: int, runs: bool = False) -> np.ndarray:
  """The model's answer tokens [N, max_new] to the questions `qs`: greedy decoding with the
  question prefixes cached once for all rows (causal model; stops when every row has closed
  its answer with EOT); for a bidirectional model (GBERT) the prompt + as many mask tokens as
  the true answer has (EOT included), predicted at once. `runs`: params are several runs'
  stacked on a leading axis, answered in one vmapped call: [R, N, max_new]."""
  fn = generate if model.cfg.causal else fill_masks
  call = functools.partial(over_runs, fn) if runs else fn
  if model.cfg.causal:
    return np.asarray(call(model, params, jnp.asarray(qs.rest_NR), jnp.asarray(qs.rest_lens_N),
                           max_new=max_new, eos_id=world.renderer.eot_id,
                           prefixes=qs.prefixes()))
  prompts, plens = qs.prompts(world.pad_id)
  return np.asarray(call(model, params, jnp.asarray(prompts), jnp.asarray(plens),
                         jnp.asarray(qs.alens_N), world.renderer.token_id(MASK),
                         max_new=max_new))


def positions_per_compile(model_cfg) -> float:
  """A compilation's cost on the model's platform (COMPILE_FLOPS) in question positions of
  `model_cfg`'s decoder (a position of a batch's width costs a prefill position: the body,
  not the head)."""
  flops = COMPILE_FLOPS.get(model_cfg.platform, ACCELERATOR_COMPILE_FLOPS)
  return flops / forward_flops(model_cfg)["body"]


def shared_widths(longest_b: np.ndarray, rows: int, compile_positions: float) -> np.ndarray:
  """Each batch's width, given each batch's longest question and the rows a batch has: some
  of the batches' longest lengths, each batch the least of them >= its own, chosen to
  minimise compile_positions x (widths used) + rows x (the widths summed over batches)."""
  levels, count = np.unique(longest_b, return_counts=True)
  # best[j]: the least cost of levels[:j], the last width levels[j - 1] (from levels[cut[j]])
  best, cut = [0.0] + [np.inf] * len(levels), [0] * (len(levels) + 1)
  for j in range(1, len(levels) + 1):
    for i in range(j):
      cost = best[i] + compile_positions + rows * count[i:j].sum() * levels[j - 1]
      if cost < best[j]:
        best[j], cut[j] = cost, i
  width, j = {}, len(levels)
  while j:
    width.update((level, levels[j - 1]) for level in levels[cut[j]:j])
    j = cut[j]
  return np.array([width[level] for level in longest_b])


def length_batches(qs: QASet, batch_size: int, compile_positions: float = 0,
                   row_multiple: int = 8):
  """(question indices, count, QASet batch): what QA eval decodes, in few distinct shapes
  (each one a compilation of the decoder). The questions, sorted by the length of their own
  part, are cut into as few batches of at most batch_size as they need, of equal size rounded
  up to row_multiple (filled by repeating the batch's first question; the first `count` rows
  are real), so neighbours in length share a batch; the batches' widths are `shared_widths`
  at `compile_positions` (QA eval's: `positions_per_compile(model_cfg)`; 0: each batch as wide
  as its longest question). The 3,000 questions of a `tiny` eval decode in one shape, where a
  batch per length made five."""
  order = np.argsort(qs.rest_lens_N, kind="stable")
  if not len(order):
    return
  n_batches = -(-len(order) // batch_size)
  size = -(-len(order) // n_batches)
  size = min(-(-size // row_multiple) * row_multiple, max(batch_size, size))
  chunks = np.array_split(order, n_batches)
  widths = shared_widths(np.array([qs.rest_lens_N[c].max() for c in chunks]), size,
                         compile_positions)
  for chunk, width in zip(chunks, widths):
    rows = np.concatenate([chunk, np.full(size - len(chunk), chunk[0])])
    yield rows, len(chunk), qs.take(rows, int(width))


def qa_correct_parts(model, params, world, parts, batch_size: int = 512, runs: bool = False):
  """qa_correct of each people array in `parts`, decoded in one pass (one set of batch shapes
  to compile): a list of (correct, attributes, answer lengths), one per part (`runs`: correct
  [R, n] of each run, as in qa_correct)."""
  correct, attrs, alens = qa_correct(model, params, world, np.concatenate(parts), batch_size,
                                     runs=runs)
  cuts = np.cumsum([len(p) * N_ATTR for p in parts])[:-1]   # N_ATTR questions per person
  return list(zip(*(np.split(x, cuts, axis=-1) for x in (correct, attrs, alens))))


def qa_correct(model, params, world, people, batch_size: int = 512, progress=None,
               runs: bool = False):
  """(correct [n] bool, attributes [n], answer lengths [n] incl. EOT) for `people`'s QA
  (person-major: N_ATTR questions per person). `runs`: params are R runs' stacked on a
  leading axis (the same model and questions: a grid's), decoded together; correct is [R, n],
  each run's row what it gives alone."""
  qs = qa_set(world, people)
  n_runs = (jax.tree.leaves(params)[0].shape[0],) if runs else ()
  correct = np.zeros((*n_runs, len(qs.attrs_N)), bool)
  for rows, n, batch in length_batches(qs, batch_size, positions_per_compile(model.cfg)):
    got = answer(model, params, world, batch, qs.answers_NW.shape[1], runs)
    correct[..., rows[:n]] = answers_match(got, batch.answers_NW, batch.alens_N)[..., :n]
    if progress:
      progress(n)
  return correct, qs.attrs_N, qs.alens_N


def by_group(groups, people, correct: np.ndarray, attrs: np.ndarray,
             score=per_attribute) -> dict[str, dict]:
  """`score` (per_attribute, or per_attribute_ci) of each group's share of the QA of `people`
  (qa_correct's order: N_ATTR answers per person, person-major); groups with none of these
  people are left out."""
  group = group_index(groups, np.repeat(np.asarray(people, np.int64), N_ATTR))
  out = {}
  for k, g in enumerate(groups):
    sel = group == k
    if sel.any():
      out[g.name] = score(correct[sel], attrs[sel])
  return out


def by_group_scored(groups, key: str, people, correct, attrs) -> dict[str, dict]:
  """{key: by_group per_attribute, key + CI: its intervals} (group_results' parts)."""
  return {key: by_group(groups, people, correct, attrs),
          key + CI: by_group(groups, people, correct, attrs, per_attribute_ci)}


def by_answer_tokens(correct: np.ndarray, attrs: np.ndarray, alens: np.ndarray) -> dict:
  """Accuracy of single-token vs multi-token answer values (EOT not counted), per attribute
  ({'single': acc, 'multi': acc, 'multi_share': fraction of multi-token answers}; a kind with
  no answers is left out) and over all attributes."""
  multi = alens - 1 > 1

  def split(sel):
    out = {k: float(correct[sel & m].mean()) for k, m in (("single", ~multi), ("multi", multi))
           if (sel & m).any()}
    return {**out, "multi_share": float(multi[sel].mean())}

  return {**{a: split(attrs == i) for i, a in enumerate(ATTRIBUTES) if (attrs == i).any()},
          "all": split(np.ones_like(multi))}


def by_answer_tokens_ci(correct: np.ndarray, attrs: np.ndarray, alens: np.ndarray,
                        persons: np.ndarray | None = None) -> dict:
  """by_answer_tokens' intervals: the same keys less `multi_share` (not an accuracy), each
  {"lo", "hi", "n"}; "all" (every attribute's) clustered by `persons` as per_attribute_ci's
  mean."""
  multi = alens - 1 > 1
  correct = np.asarray(correct, bool)
  persons = person_of(correct.size) if persons is None else persons

  def split(sel, pooled=False):
    return {k: (pooled_interval(correct[sel & m], persons[sel & m]) if pooled else
                interval(correct[sel & m].sum(), (sel & m).sum()))
            for k, m in (("single", ~multi), ("multi", multi)) if (sel & m).any()}

  return {**{a: split(attrs == i) for i, a in enumerate(ATTRIBUTES) if (attrs == i).any()},
          "all": split(np.ones_like(multi), pooled=True)}


def bio_recall(model, params, world, people, batch_size: int = 256):
  """Exact match of each attribute value inside each person's first bio: teacher-forced for a
  causal model; for a bidirectional one each value is masked in turn (the other five stay
  visible) and predicted in one pass."""
  return per_attribute(*bio_recall_correct(model, params, world, people, batch_size))


@functools.partial(jax.jit, static_argnames="model")
def _greedy_in_place(model, params, tokens_BL, lens_B):
  """The greedy token at every position of right-padded documents (one segment each)."""
  positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
  seg = (positions < lens_B[:, None]).astype(jnp.int32)
  logits, _, _ = model.apply({"params": params}, tokens_BL, positions, seg)
  return greedy(logits)


def value_masks(tokens_BL: np.ndarray, spans_BA2: np.ndarray) -> np.ndarray:
  """[B, A, L] bool: the positions a bidirectional model's recall of attribute a masks in each
  bio: a's value, and any other value of the same tokens (a birth city that is also the
  company's city: left visible, the model copied it and recall read high)."""
  cols = np.arange(tokens_BL.shape[1])
  in_span = (cols >= spans_BA2[..., :1]) & (cols < spans_BA2[..., 1:])     # [B, A, L]
  masks = in_span.copy()
  for b, row in enumerate(spans_BA2):
    values = [tuple(tokens_BL[b, s:e]) for s, e in row]
    for a, v in enumerate(values):
      for other, w in enumerate(values):
        if other != a and w == v:
          masks[b, a] |= in_span[b, other]
  return masks


def bio_recall_correct(model, params, world, people, batch_size: int = 256):
  """bio_recall's (correct [n * N_ATTR] bool, attributes [n * N_ATTR]), person-major.
  The bios are padded to a multiple of 64 positions, so runs whose longest bio differs (the
  rows of a grid) share one compiled program."""
  r = world.renderer
  docs, spans = world.bio_docs(people, np.zeros(len(people), np.int64))   # copy 0
  tokens, lens = docs.padded(world.pad_id)
  width = -(-tokens.shape[1] // 64) * 64
  tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=world.pad_id)
  causal = model.cfg.causal
  variants = 1 if causal else N_ATTR      # bidirectional: one input per masked attribute
  batch_size = max(1, min(batch_size // variants, len(tokens)))

  correct = np.zeros((len(tokens), N_ATTR), bool)
  for idx, n in _batches(len(tokens), batch_size):
    toks = np.repeat(tokens[idx][:, None], variants, 1)                # [B, variants, L]
    if not causal:
      toks[value_masks(tokens[idx], spans[idx])] = r.token_id(MASK)
    pred = np.asarray(_greedy_in_place(model, params, jnp.asarray(toks.reshape(-1, width)),
                                       jnp.asarray(np.repeat(lens[idx], variants))))
    pred = pred.reshape(toks.shape)
    shift = 1 if causal else 0                # causal: the value at s..e is predicted at s-1..e-1
    for j in range(n):
      row = idx[j]
      for a, (s, e) in enumerate(spans[row]):
        correct[row, a] = (pred[j, 0 if causal else a, s - shift:e - shift]
                           == tokens[row, s:e]).all()
  attrs = np.broadcast_to(np.arange(N_ATTR), correct.shape)
  return correct.ravel(), attrs.ravel()
