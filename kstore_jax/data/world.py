"""Everything data a run needs, built once from the config: population, renderer, sources.

Groups (`data.groups`, configs/base.group): named contiguous person-id ranges, laid out in
sorted name order, each with its share of the people, its bio augmentation, its share of the
pretraining bio positions and its QA-train fraction. Without groups the world has one group
'all' built from the top-level data keys.

QA split (`qa_split`): each group's people are QA-train (their QA is training data), QA-test
(held out) or, with `data.qa_valid_fraction` > 0, QA-valid: that fraction of each group's
QA-train side, held back from training for tuning (QA eval reports `qa_valid`). The test side
is the same with or without a valid share.
"""

import dataclasses
import functools
import hashlib

import numpy as np
import tokenizers

from configs import base
from kstore_jax.data import (hashing, imported, masking, pipeline, population, records, render,
                             sources)
from kstore_jax.data.tokenizer import PAD
from kstore_jax.errors import ConfigError

_H_SPLIT, _H_VALID = 3, 4   # hash purposes of the QA split (render.py has 1, 2: never reuse one)


@dataclasses.dataclass(frozen=True)
class Group:
  """People [start, stop) whose bios follow `aug`; `tokens` is their share of the pretraining
  bio positions; `qa_train_fraction` of them have their QA in training."""
  name: str
  start: int
  stop: int
  aug: render.AugSpec
  tokens: float
  qa_train_fraction: float

  @property
  def people(self) -> np.ndarray:
    return np.arange(self.start, self.stop)


def group_bounds(shares, n_people: int) -> np.ndarray:
  """Person-id boundaries [len(shares) + 1] of contiguous groups with these shares of
  n_people: the rounded cumulative shares, so the sizes always sum to n_people."""
  bounds = np.round(np.cumsum([0.0, *shares]) * n_people).astype(np.int64)
  bounds[-1] = n_people
  return bounds


def group_index(groups, people) -> np.ndarray:
  """Index in `groups` (contiguous id ranges in order) of each person's group."""
  return np.searchsorted([g.stop for g in groups], people, side="right")


def make_groups(data_cfg) -> tuple[Group, ...]:
  """data.groups as contiguous id ranges in sorted name order (one group 'all' without)."""
  specs = data_cfg.get("groups")
  if not specs:
    return (Group("all", 0, data_cfg.n_people, render.AugSpec.from_config(data_cfg), 1.0,
                  data_cfg.qa_train_fraction),)
  names = sorted(specs.keys())
  bounds = group_bounds([specs[n].people for n in names], data_cfg.n_people)
  return tuple(Group(n, int(bounds[i]), int(bounds[i + 1]), render.AugSpec.from_config(specs[n]),
                     specs[n].tokens, specs[n].qa_train_fraction) for i, n in enumerate(names))


def qa_train_split(seed: int, n_people: int, train_fraction: float = 0.5,
                   first: int = 0) -> np.ndarray:
  """Boolean [n_people] over person ids first .. first + n_people - 1: True for people whose
  QA is training data; deterministic."""
  people = np.arange(first, first + n_people)
  rank = np.argsort(hashing.hash_keys(seed, _H_SPLIT, people), kind="stable")
  is_train = np.zeros(n_people, bool)
  is_train[rank[:int(round(train_fraction * n_people))]] = True
  return is_train


def qa_valid_split(seed: int, is_train: np.ndarray, valid_fraction: float,
                   first: int = 0) -> np.ndarray:
  """Boolean like `is_train` (qa_train_split's, over person ids first ..): True for the
  round(valid_fraction * is_train.sum()) people of the QA-train side held back for tuning
  (their QA is neither trained on nor test), drawn by a hash of the person id independent of
  qa_train_split's; deterministic. A subset of is_train, so the test side is the same with any
  valid_fraction."""
  is_train = np.asarray(is_train, bool)
  train = np.flatnonzero(is_train)
  rank = np.argsort(hashing.hash_keys(seed, _H_VALID, first + train), kind="stable")
  held = np.zeros(len(is_train), bool)
  held[train[rank[:int(round(valid_fraction * len(train)))]]] = True
  return held


def qa_split(seed: int, data_cfg, groups=None) -> tuple[np.ndarray, np.ndarray]:
  """(qa_train, qa_valid) bool [n_people]: people whose QA is training data, and people of
  the QA-train side held back for tuning (`data.qa_valid_fraction` of each group's QA-train
  people); the rest are QA-test. Disjoint; deterministic in the seed."""
  groups = make_groups(data_cfg) if groups is None else groups
  frac = data_cfg.get("qa_valid_fraction", 0.0)
  train = [qa_train_split(seed, g.stop - g.start, g.qa_train_fraction, g.start) for g in groups]
  valid = [qa_valid_split(seed, t, frac, g.start) for t, g in zip(train, groups)]
  return np.concatenate([t & ~v for t, v in zip(train, valid)]), np.concatenate(valid)


@dataclasses.dataclass
class World:
  seed: int
  pop: population.Population
  renderer: render.Renderer
  groups: tuple[Group, ...]  # contiguous person-id ranges covering everyone
  qa_train: np.ndarray     # bool [n_people]: QA of these people is training data
  qa_valid: np.ndarray | None = None   # bool [n_people]: held back for tuning (None: nobody)
  stored: imported.BioStore | None = None   # an imported world's bios (None: rendered)

  def __post_init__(self):
    if self.qa_valid is None:
      self.qa_valid = np.zeros_like(self.qa_train)

  @property
  def aug(self) -> render.AugSpec:
    """Everyone's bio augmentation (ValueError when the groups write bios differently)."""
    augs = {g.aug for g in self.groups}
    if len(augs) > 1:
      raise ValueError("data.groups write bios differently: use World.groups / bio_docs")
    return augs.pop()

  @property
  def train_people(self) -> np.ndarray:
    return np.flatnonzero(self.qa_train)

  @property
  def test_people(self) -> np.ndarray:
    return np.flatnonzero(~self.qa_train & ~self.qa_valid)

  @property
  def valid_people(self) -> np.ndarray:
    """The QA-valid people: neither trained on nor test (empty unless data.qa_valid_fraction)."""
    return np.flatnonzero(self.qa_valid)

  @functools.cached_property
  def digest(self) -> str:
    """sha256 of what the world holds: every person's attributes, the groups, the QA split and
    an imported world's stored bios. Equal for equal data: a rerun that would train on other
    people or other bios (an edited data.source file) has another digest."""
    h = hashlib.sha256()
    parts = [*self.pop.content(), self.qa_train, self.qa_valid]
    if self.stored is not None:
      parts += [getattr(self.stored, f.name) for f in dataclasses.fields(self.stored)]
    for a in parts:
      a = a if isinstance(a, bytes) else np.ascontiguousarray(a)
      h.update(f"{len(a)}:{getattr(a, 'dtype', '')}{getattr(a, 'shape', '')}".encode())
      h.update(a if isinstance(a, bytes) else a.tobytes())
    h.update(repr([(g.name, g.start, g.stop, g.aug, g.tokens, g.qa_train_fraction)
                   for g in self.groups]).encode())
    return h.hexdigest()

  def group_of(self, people) -> np.ndarray:
    """Index in `groups` of each person's group."""
    return group_index(self.groups, people)

  @property
  def pad_id(self) -> int:
    return self.renderer.token_id(PAD)

  def _bio_source(self, people, aug: render.AugSpec):
    """The bios of `people`, aug.copies each: rendered (BioSource) or imported (StoredBios)."""
    if self.stored is not None:
      return imported.StoredBios(self.stored, people, aug.copies)
    return sources.BioSource(self.renderer, self.pop, people, aug, self.seed)

  def bios(self, people=None):
    """Bios of `people` (default: everyone) written as `aug` (one augmentation for everyone;
    with groups that differ use group_bios / bio_mixture)."""
    return self._bio_source(np.arange(len(self.pop)) if people is None else people, self.aug)

  def group_bios(self, group: Group):
    return self._bio_source(group.people, group.aug)

  def bio_docs(self, people, copies) -> tuple[render.Docs, np.ndarray]:
    """The bios (people[i], copies[i]), each as its person's group writes it, and their value
    token spans [n, 6, 2] (doc coordinates, EOT at 0)."""
    people, copies = np.asarray(people, np.int64), np.asarray(copies, np.int64)
    if self.stored is not None:
      ids = self.stored.bio_ids(people, copies)
      return self.stored.docs(ids), self.stored.spans[ids]
    pieces = np.empty((len(people), render.BIO_PIECES), np.int64)
    order = np.empty((len(people), render.N_ATTR), np.int64)
    group = self.group_of(people)
    for k, g in enumerate(self.groups):
      sel = group == k
      if sel.any():   # (a group none of `people` is in renders nothing)
        pieces[sel], order[sel] = self.renderer.bio_pieces(self.pop, people[sel], copies[sel],
                                                           g.aug, self.seed)
    r = self.renderer
    return r.render(pieces, r.bio_loss_pieces()), r.value_spans(pieces, order)

  def qa(self, people) -> sources.QASource:
    return sources.QASource(self.renderer, self.pop, people)

  @functools.cached_property
  def bio_positions(self) -> list[tuple[int, int, int]]:
    """(total, shortest, longest) positions of each group's bios."""
    return [_positions(self.group_bios(g)) for g in self.groups]

  def bio_mixture(self) -> tuple[list, list]:
    """Each group's bio source and its document weight (summing to 1). The pipeline mixes
    documents, so a group's share of the bio *positions* (`tokens`) becomes the document
    weight tokens / mean positions per bio, normalised."""
    srcs = [self.group_bios(g) for g in self.groups]
    if len(srcs) == 1:
      return srcs, [1.0]
    w = np.array([g.tokens * len(s) / total for g, s, (total, _, _) in
                  zip(self.groups, srcs, self.bio_positions)])
    return srcs, (w / w.sum()).tolist()

  def stage_mixture(self, stage: str, data_cfg) -> tuple[list, list]:
    """(sources, weights) of a training stage's document stream."""
    bios, weights = self.bio_mixture()
    if stage == "pretrain":
      return bios, weights
    if stage == "pretrain_mixed":
      r = data_cfg.qa_ratio
      return [*bios, self.qa(self.train_people)], [*((1.0 - r) * w for w in weights), r]
    if stage == "finetune":
      return [self.qa(self.train_people)], [1.0]
    raise ValueError(f"stage {stage!r} has no document stream")

  @functools.cached_property
  def doc_positions(self) -> tuple[int, int]:
    """(shortest, longest) bio or QA of this population, in positions (tokens - 1)."""
    qa = _positions(self.qa(np.arange(len(self.pop))))
    every = [*self.bio_positions, qa]
    return min(s for _, s, _ in every), max(longest for _, _, longest in every)

  def max_doc_positions(self) -> int:
    """The longest bio or QA of this population, in positions (tokens - 1)."""
    return self.doc_positions[1]

  def check_streams(self, stages, data_cfg) -> None:
    """ConfigError naming the key (data.qa_ratio, a group's `tokens` share) when a stage of
    `stages` would mix a source in at a positive weight under one document per chunk:
    mix_counts (data/pipeline.py) rounds that to none, and the source (QA pairs, a group's
    bios) would never be read. The one owner of this rule."""
    n, r = data_cfg.chunk_docs, data_cfg.qa_ratio
    for stage in (s for s in base.BASE_STAGES if s in stages):
      weights = self.stage_mixture(stage, data_cfg)[1]
      if stage == "pretrain_mixed" and any(0 < w * n < 1 for w in (r, sum(weights[:-1]))):
        raise ConfigError(
            f"data.qa_ratio={r}: a pretrain_mixed chunk of data.chunk_docs={n} documents would "
            f"hold {r * n:.3g} QA pairs and {(1 - r) * n:.3g} bios; each must be 0 or at "
            "least 1")
      if len(self.groups) == 1:
        continue
      for g, w in zip(self.groups, weights):
        if w * n < 1:
          raise ConfigError(
              f"data.groups.{g.name}.tokens={g.tokens:g}: a {stage} chunk of "
              f"data.chunk_docs={n} documents would hold {w * n:.3g} of its bios, i.e. none: "
              "raise the share or data.chunk_docs")

  def chunks(self, stage: str, data_cfg, mlm: bool = False) -> pipeline.PackedChunks:
    """The stage's packed stream, drawn with the stage seed (`base.stage_seed`); `mlm`:
    whole-word masked-LM rows (data_cfg.mlm rates)."""
    srcs, weights = self.stage_mixture(stage, data_cfg)
    spec = masking.MlmSpec.from_config(data_cfg.mlm, self.renderer) if mlm else None
    return pipeline.PackedChunks(srcs, weights, data_cfg.seq_len, self.pad_id,
                                 seed=base.stage_seed(self.seed, stage),
                                 chunk_docs=data_cfg.chunk_docs, mlm=spec)


def _positions(src, block: int = 1 << 20) -> tuple[int, int, int]:
  """(total, shortest, longest) positions (tokens - 1) of a source's documents, from the
  source's `lengths` (no rendering), `block` docs at a time."""
  total, shortest, longest = 0, np.iinfo(np.int64).max, 0
  for s in range(0, len(src), block):
    positions = src.lengths(np.arange(s, min(s + block, len(src)))) - 1
    total += int(positions.sum())
    shortest, longest = min(shortest, int(positions.min())), max(longest, int(positions.max()))
  return total, shortest, longest


def imported_groups(corpus: records.Corpus, order: np.ndarray, data_cfg) -> tuple[Group, ...]:
  """An imported world's groups: data.groups' names, shares of the bio positions and QA-train
  fractions over the dataset's groups of people (laid out in `order`), or one group 'all' of
  everyone; a group's copies per person are the dataset's."""
  specs = data_cfg.get("groups")
  names = sorted(specs.keys()) if specs else [records.DEFAULT_GROUP]
  label = (np.array(corpus.groups, object)[order] if specs
           else np.full(len(order), records.DEFAULT_GROUP, object))
  copies = np.bincount(corpus.bio_person, minlength=len(order))[order]
  if not specs and (copies != copies[0]).any():   # data/records.py checks each named group
    odd = int(np.argmax(copies != copies[0]))
    raise ConfigError(
        f"{corpus.where}: person {corpus.ids[order[odd]]} has {copies[odd]} bios, person "
        f"{corpus.ids[order[0]]} has {copies[0]} (without data.groups everyone is one group, "
        "and every person of a group needs the same number)")
  out, start = [], 0
  for n in names:
    stop = start + int((label == n).sum())
    spec = specs[n] if specs else data_cfg
    out.append(Group(n, start, stop, render.AugSpec(multi=int(copies[start])),
                     spec.tokens if specs else 1.0, spec.qa_train_fraction))
    start = stop
  return tuple(out)


def build_imported_world(cfg, tokenizer: tokenizers.Tokenizer) -> World:
  """The world of an imported `data.source`: its people, their bios and groups (data.groups
  naming the dataset's groups, else one group 'all')."""
  corpus = records.read_source(cfg.data.source)
  specs = cfg.data.get("groups")
  order = imported.people_order(corpus, sorted(specs.keys()) if specs else None)
  groups = imported_groups(corpus, order, cfg.data)
  qa_train, qa_valid = qa_split(cfg.seed, cfg.data, groups)
  if not qa_train.any():   # configlib.validate checks the generated data.n_people's split
    keys = ([f"data.groups.{g.name}.qa_train_fraction={g.qa_train_fraction:g}" for g in groups]
            if specs else [f"data.qa_train_fraction={cfg.data.qa_train_fraction:g}"])
    raise ConfigError(
        f"{corpus.where}: {', '.join(keys)} and data.qa_valid_fraction="
        f"{cfg.data.get('qa_valid_fraction', 0.0):g} leave none of its {len(order)} people "
        "with QA training data")
  if not (~qa_train & ~qa_valid).any():
    raise ConfigError(f"{corpus.where}: the QA split holds none of its {len(order)} people out "
                      "(data.qa_train_fraction): QA eval and the probes score held-out people")
  pop, renderer, stored = imported.build(corpus, tokenizer, order)
  return World(seed=cfg.seed, pop=pop, renderer=renderer, groups=groups, qa_train=qa_train,
               qa_valid=qa_valid, stored=stored)


def build_world(cfg, tokenizer: tokenizers.Tokenizer) -> World:
  """The world of `cfg`: generated, or imported (`data.source`, build_imported_world). With
  data.groups a generated population is drawn per person (population.make_population), so a
  group keeps its people when later groups change. ConfigError when a stage of cfg.stages would
  never read a group's bios (check_streams)."""
  data = cfg.data
  if records.parse_source(data.source)[0] != records.GENERATED:
    world = build_imported_world(cfg, tokenizer)
  else:
    groups = make_groups(data)
    qa_train, qa_valid = qa_split(cfg.seed, data, groups)
    world = World(seed=cfg.seed,
                  pop=population.make_population(cfg.seed, data.n_people,
                                                 per_person=bool(data.get("groups"))),
                  renderer=render.Renderer(tokenizer), groups=groups,
                  qa_train=qa_train, qa_valid=qa_valid)
  world.check_streams(base.stage_list(cfg), data)
  return world
