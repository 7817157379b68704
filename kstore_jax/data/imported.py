"""An imported world's parts (`data.source = tfds:DIR | jsonl:FILE`): its people as a table
like the generated Population (`Roster`), a Renderer that renders their QA like the generated
one (`RosterRenderer`), and their bios tokenised once (`BioStore`, served by `StoredBios`).

A bio is tokenised in segments: the text between the values, and each value together with the
space before it, so its token span is exact; the text gets a leading space when it has none
(generated bios start with " " + the name after EOT). A value is the same tokens in its bios
as in its QA answer (" " + value) only where the bio writes it as the record does (same case)
right after a space (" ", not a tab or newline) or at the start: one after another character
("(May 3, 1950", or after a newline) is tokenised without the space, and one located or given
case-insensitively keeps the bio's spelling (" law" where the QA answer is " Law"), so those
bio tokens differ from the answer's. Documents are [EOT] + text + [EOT] as in render.py. The
store keeps model ids (int32, 4 bytes a token), token spans and offsets: no Python object per
bio.
"""

import dataclasses

import numpy as np

from kstore_jax.data import records, render
from kstore_jax.data.render import N_ATTR, Docs
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.data.tokenizer import EOT
from kstore_jax.errors import ConfigError

_BATCH = 2048            # bios tokenised per encode_batch call


class Roster:
  """Imported people, with the generated Population's interface (len, attribute, birth_month,
  full_name, values, find, value_counts). Class ids index each attribute's sorted distinct
  value texts (`tables`)."""

  def __init__(self, names, values):
    self.names = tuple(names)
    cols = list(zip(*values))
    self.tables = {a: tuple(sorted(set(col))) for a, col in zip(ATTRIBUTES, cols)}
    self.ids = np.stack([np.searchsorted(np.array(self.tables[a], object), np.array(col, object))
                         for a, col in zip(ATTRIBUTES, cols)], 1).astype(np.int32)   # [N, 6]
    self.birth_month = np.array([records.birth_month(d) for d in self.tables["birth_date"]],
                                np.int8)[self.ids[:, 0]]
    self._index = {n: i for i, n in enumerate(self.names)}

  def __len__(self) -> int:
    return len(self.names)

  def attribute(self, name: str) -> np.ndarray:
    """Class id of attribute `name` for every person."""
    return self.ids[:, ATTRIBUTES.index(name)]

  def value_counts(self) -> dict[str, int]:
    return {a: len(t) for a, t in self.tables.items()}

  def content(self) -> list:
    """Everything that tells people apart (arrays and bytes), for World.digest."""
    return [self.ids, repr((self.names, self.tables)).encode()]

  def full_name(self, person: int) -> str:
    return self.names[person]

  def values(self, person: int) -> dict[str, str]:
    return {a: self.tables[a][self.ids[person, k]] for k, a in enumerate(ATTRIBUTES)}

  def find(self, full_name: str) -> int:
    """Index of the person with this full name (KeyError if none)."""
    if full_name not in self._index:
      raise KeyError(f"no person named {full_name!r}")
    return self._index[full_name]


class RosterRenderer(render.Renderer):
  """The generated Renderer's piece table plus a piece per imported name (" " + name) and per
  attribute value (" " + value); QA renders with them (name in the first name slot, value in the
  first value slot, the other slots the empty piece). `extra_ids`: the bios' tokenizer ids."""

  def __init__(self, tokenizer, roster: Roster, extra_ids):
    tables = [roster.tables[a] for a in ATTRIBUTES]
    texts = [" " + n for n in roster.names] + [" " + v for t in tables for v in t]
    super().__init__(tokenizer, texts, extra_ids)
    self.name0, self.name_stop = self.extra0, self.extra0 + len(roster)
    starts = self.name_stop + np.cumsum([0, *map(len, tables[:-1])])
    self.value0 = dict(zip(ATTRIBUTES, starts.tolist()))   # class_tokens reads value0

  @property
  def longest_name(self) -> int:
    """Tokens of the roster's longest name (not the generated pools': names of any length)."""
    return int(self.piece_len[self.name0:self.name_stop].max())

  def name_pieces(self, pop: Roster, people) -> np.ndarray:
    people = np.asarray(people, np.int64)
    return np.stack([self.name0 + people, *np.zeros((2, len(people)), np.int64)], -1)

  def _value_pieces(self, pop: Roster, people) -> np.ndarray:
    out = np.zeros((len(people), N_ATTR, 4), np.int64)
    out[:, :, 0] = np.array([self.value0[a] for a in ATTRIBUTES]) + pop.ids[people]
    return out


def segments(text: str, spans) -> tuple[list[str], list[int]]:
  """`text` (given a leading space when it has none) cut into the text between the values and
  each value with the space before it; (segments, the segment index of each attribute's
  value). `spans` [6, 2]: character spans in `text` as given."""
  if not text[:1].isspace():
    text, spans = " " + text, np.asarray(spans) + 1
  segs, at, prev = [], [0] * N_ATTR, 0
  for k in np.argsort(np.asarray(spans)[:, 0], kind="stable").tolist():
    s, e = (int(x) for x in spans[k])
    s -= text[s - 1:s] == " "
    if s > prev:
      segs.append(text[prev:s])
    at[k] = len(segs)
    segs.append(text[s:e])
    prev = e
  if prev < len(text):
    segs.append(text[prev:])
  return segs, at


@dataclasses.dataclass
class BioStore:
  """Tokenised bios in (person, copy) order: bio b is tokens[offsets[b]:offsets[b + 1]] (model
  ids, [EOT] + text + [EOT]) with token spans [B, 6, 2] (doc coordinates, EOT at 0); person
  p's bios are first[p] .. first[p] + copies - 1."""
  tokens: np.ndarray
  offsets: np.ndarray
  spans: np.ndarray
  first: np.ndarray

  def bio_ids(self, people, copies) -> np.ndarray:
    return self.first[np.asarray(people, np.int64)] + np.asarray(copies, np.int64)

  def lengths(self, bios) -> np.ndarray:
    bios = np.asarray(bios, np.int64)
    return self.offsets[bios + 1] - self.offsets[bios]

  def docs(self, bios) -> Docs:
    bios = np.asarray(bios, np.int64)
    lens = self.lengths(bios)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    src = np.repeat(self.offsets[bios] - offsets[:-1], lens) + np.arange(offsets[-1])
    loss = np.ones(int(offsets[-1]), bool)
    loss[offsets[:-1]] = False              # every token but the opening EOT is a target
    return Docs(tokens=self.tokens[src], loss=loss, offsets=offsets)


class StoredBios:
  """Grain random-access source of the bios of `people` (`copies` each) from a BioStore: index i
  -> (people[i // copies], i % copies), as sources.BioSource."""

  def __init__(self, store: BioStore, people, copies: int):
    self.store, self.copies = store, copies
    self.people = np.asarray(people, np.int64)

  def __len__(self) -> int:
    return len(self.people) * self.copies

  def __repr__(self) -> str:
    return f"StoredBios(people={len(self.people)}, copies={self.copies})"

  def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
    q, copy = np.divmod(np.asarray(indices, np.int64), self.copies)
    return self.people[q], copy

  def bio_ids(self, indices) -> np.ndarray:
    return self.store.bio_ids(*self.locate(indices))

  def docs(self, indices) -> Docs:
    return self.store.docs(self.bio_ids(indices))

  def spans(self, indices) -> np.ndarray:
    return self.store.spans[self.bio_ids(indices)]

  def lengths(self, indices) -> np.ndarray:
    return self.store.lengths(self.bio_ids(indices))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    person, copy = self.locate([index])
    return {**self.docs([index]).doc(0), "spans": self.spans([index])[0],
            "person": person[0], "copy": copy[0]}


def tokenize(corpus: records.Corpus, bios: np.ndarray, tokenizer):
  """Tokenizer ids of the bios (record indices, in this order) as ([EOT] + text + [EOT]):
  (flat ids, offsets [B + 1], token spans [B, 6, 2]). Value segments are encoded once per
  distinct text."""
  eot = tokenizer.token_to_id(EOT)
  cache: dict[str, list[int]] = {}
  parts, spans = [], np.empty((len(bios), N_ATTR, 2), np.int64)
  lens = np.empty(len(bios), np.int64)
  for start in range(0, len(bios), _BATCH):
    batch = bios[start:start + _BATCH]
    cut = [segments(t, s) for t, s in zip(corpus.texts(batch), corpus.bio_spans[batch])]
    fresh = sorted({s for segs, at in cut for k, s in enumerate(segs) if k not in at} |
                   {segs[k] for segs, at in cut for k in at if segs[k] not in cache})
    for s, enc in zip(fresh, tokenizer.encode_batch(fresh, add_special_tokens=False)):
      cache[s] = enc.ids
    for j, (segs, at) in enumerate(cut):
      ids = [eot]
      bounds = []
      for s in segs:
        bounds.append(len(ids))
        ids += cache[s]
      bounds.append(len(ids))
      ids.append(eot)
      spans[start + j] = [(bounds[k], bounds[k + 1]) for k in at]
      lens[start + j] = len(ids)
      parts.append(np.asarray(ids, np.int32))
    for segs, at in cut:           # only the values' texts stay cached
      for k, s in enumerate(segs):
        if k not in at:
          cache.pop(s, None)
  return np.concatenate(parts), np.concatenate([[0], np.cumsum(lens)]), spans


def people_order(corpus: records.Corpus, group_names) -> np.ndarray:
  """Corpus people in world order: by group (in `group_names` order; None: one group of
  everyone), each group's by person id; ConfigError when data.groups names other groups than
  the dataset's."""
  if group_names is None:
    return np.argsort(corpus.ids, kind="stable")
  have = sorted(set(corpus.groups))
  if have != sorted(group_names):
    raise ConfigError(f"data.groups {sorted(group_names)} must be the groups of the dataset "
                      f"{corpus.where}: {have}")
  rank = {g: i for i, g in enumerate(group_names)}
  return np.lexsort((corpus.ids, [rank[g] for g in corpus.groups]))


def build(corpus: records.Corpus, tokenizer, order: np.ndarray):
  """(Roster, RosterRenderer, BioStore) of the corpus's people in `order` (world person p =
  corpus person order[p])."""
  roster = Roster([corpus.names[i] for i in order], [corpus.values[i] for i in order])
  world_of = np.empty(len(order), np.int64)
  world_of[order] = np.arange(len(order))
  person = world_of[corpus.bio_person]
  bios = np.lexsort((corpus.bio_copy, person))           # (person, copy) order
  ids, offsets, spans = tokenize(corpus, bios, tokenizer)
  renderer = RosterRenderer(tokenizer, roster, np.unique(ids))
  first = np.concatenate([[0], np.cumsum(np.bincount(person, minlength=len(order)))[:-1]])
  return roster, renderer, BioStore(renderer.to_model_ids(ids), offsets, spans, first)
