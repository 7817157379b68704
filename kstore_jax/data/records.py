"""Bio records: the export/import format of a world's bios, checked and indexed (`data.source`).

One record per bio, the same fields in JSON lines (`jsonl:FILE`, one object a line) and in the
tfds dataset (`tfds:DIR`, data/tfds_bios.py):

    person  int    the person's id (records with the same id are copies of one person's bios)
    name    str    the person's full name (unique per person)
    birth_date, birth_city, university, major, company, company_city   str   the six values
    text    str    the bio (the values in any order and wording)
    group   str    optional: the person's group (data.groups), default "all"
    copy    int    optional: which of the person's bios (0..k-1), default: order of appearance
    spans   {attribute: [start, end]}   optional, any subset: character span of the value in
                   `text`; a missing one is located: the value as a whole word, exactly, then
                   case-insensitively, not overlapping the name (a value may hold it: "George
                   Mason University" of George Mason) or another value

Reading (`read_source`) checks every record in one pass and keeps an index (NumPy: where each
record is, its person, copy and located spans; the people's facts once each), not the texts:
`Corpus.texts(bios)` reads them back by random access (a JSON line by its byte offset, an
array_record by its index). A problem raises ConfigError naming the file, the line (record)
and the field: malformed or truncated JSON (or JSON the parser gives up on: a number of
thousands of digits, nesting past its recursion limit), an unknown or missing field, a string
UTF-8 cannot encode (a lone surrogate escape) or holding one of the tokenizer's special tokens,
a value not in the bio, given spans that overlap each other or cut across the name, a birth
date naming no month, an id out of int64's range, a person whose records disagree, two people
with one name, copies that are not 0..k-1, a group whose people have different numbers of
bios, an empty dataset.
"""

import array
import dataclasses
import functools
import json
import mmap
import os
import re

import numpy as np

from kstore_jax.data.population import MONTHS
from kstore_jax.data.templates import ATTRIBUTES, QUESTIONS
from kstore_jax.errors import ConfigError, no_file

N_ATTR = len(ATTRIBUTES)
PERSON_FIELDS = ("person", "name", "group", *ATTRIBUTES)
FIELDS = (*PERSON_FIELDS, "copy", "text", "spans")
REQUIRED = ("person", "name", *ATTRIBUTES, "text")
DEFAULT_GROUP = "all"
GENERATED = "generated"
KINDS = ("tfds", "jsonl")
ID_LIMIT = 2 ** 63     # person and copy are int64 in the index (and in the tfds records)
# The tokenizer's special tokens: document separator, pad and mask (data/tokenizer.py, which
# imports this module, takes them from here). The tokenizer matches them anywhere in a text,
# add_special_tokens=False or not, so a record's string holding one would put a separator,
# pad or mask inside a document: refused.
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|mask|>")
_MONTH = re.compile(r"(?<![^\W\d_])(" + "|".join(m[:3] for m in MONTHS) + r")[a-z]*\.?(?![^\W\d_])",
                    re.IGNORECASE)
_ISO = re.compile(r"\b\d{4}-(\d{2})-\d{2}\b")


def parse_source(spec: str) -> tuple[str, str]:
  """`data.source` -> (kind, path): ('generated', '') or ('tfds' | 'jsonl', path)."""
  if spec == GENERATED:
    return GENERATED, ""
  kind, sep, path = spec.partition(":")
  if not sep or kind not in KINDS or not path:
    raise ConfigError(f"data.source={spec!r} must be 'generated', 'tfds:DIR' or 'jsonl:FILE'")
  return kind, path


def birth_month(date: str) -> int:
  """Month 0..11 named in a birth date text ("May 3, 1950", "3 Sep. 1950", "1950-05-03");
  ValueError when it names none (the probes predict the birth month)."""
  m = _MONTH.search(date)
  if m:
    return [x[:3].lower() for x in MONTHS].index(m.group(1).lower())
  iso = _ISO.search(date)
  if iso and 1 <= int(iso.group(1)) <= 12:
    return int(iso.group(1)) - 1
  raise ValueError(f"birth_date: {date!r} names no month (January..December or YYYY-MM-DD): "
                   "the probes predict the birth month")


def _is_word_char(c: str) -> bool:
  return c.isalnum() or c == "_"


def _words(text: str, value: str, fold: bool):
  """(start, end) of each occurrence of `value` in `text` as a whole word (no letter, digit or
  underscore glued to either end), case-insensitively when `fold`."""
  if fold and len(text.lower()) != len(text):   # lower() changed the length: let re fold
    pattern = re.compile(r"(?<!\w)" + re.escape(value) + r"(?!\w)", re.IGNORECASE)
    yield from (m.span() for m in pattern.finditer(text))
    return
  hay, needle = (text.lower(), value.lower()) if fold else (text, value)
  i = hay.find(needle)
  while i >= 0:
    e = i + len(needle)
    if not ((i > 0 and _is_word_char(hay[i - 1])) or (e < len(hay) and _is_word_char(hay[e]))):
      yield i, e
    i = hay.find(needle, i + 1)


def _free(spans, start: int, end: int) -> bool:
  return all(end <= s or start >= e for s, e in spans)


def _unowned(text: str, value: str, owned):
  """`value`'s whole-word occurrences in `text` clear of the `owned` spans: the exact ones, then
  the case-insensitive ones (searched only when the caller reads past the exact ones)."""
  for fold in (False, True):
    yield from (se for se in _words(text, value, fold) if _free(owned, *se))


def _names_outside(names, start: int, end: int, proper: bool) -> list:
  """The name's occurrences `names` but those inside [start, end): a value may hold the name
  ("George Mason University" of George Mason), and a bio is cut into value segments only, so
  the name inside one repeats no text. `proper`: only those inside a longer span count as the
  value's (a located value that is the name itself does not take the name's own mention)."""
  return [(s, e) for s, e in names
          if not (start <= s and e <= end and (not proper or e - s < end - start))]


def locate(text: str, name: str, values, given: dict) -> np.ndarray:
  """Character spans [6, 2] of the six `values` in `text`: `given` ones (attribute -> (start,
  end)) as they are, the others located as whole words (exactly, then case-insensitively),
  longest value first, each clear of the spans taken so far and of the name's occurrences but
  those inside it (`_names_outside`). ValueError('<field>: ...') when a value is not there, or
  when a given span overlaps another or cuts across the name (a bio is tokenised with its
  values cut out as segments: overlapping ones would repeat text, data/imported.py)."""
  spans = np.full((N_ATTR, 2), -1, np.int64)
  names = list(_words(text, name, fold=True))
  for a, (start, end) in given.items():
    k = ATTRIBUTES.index(a)
    if text[start:end].lower() != values[k].lower():
      raise ValueError(f"spans.{a}: text[{start}:{end}] is {text[start:end]!r}, not the "
                       f"{a} value {values[k]!r}")
    held = [*((f"the name {name!r} at", se) for se in _names_outside(names, start, end, False)),
            *((f"spans.{b}", se) for b, se in zip(ATTRIBUTES, spans.tolist()) if se[0] >= 0)]
    for what, (s, e) in held:
      if not _free([(s, e)], start, end):
        raise ValueError(f"spans.{a}: [{start}, {end}] overlaps {what} [{s}, {e}]")
    spans[k] = start, end
  owned = [tuple(s) for s in spans.tolist() if s[0] >= 0]
  for k in sorted((k for k in range(N_ATTR) if spans[k, 0] < 0), key=lambda k: -len(values[k])):
    hit = next((se for se in _unowned(text, values[k], owned)
                if _free(_names_outside(names, *se, True), *se)), None)
    if hit is None:
      where = (f"only where the name {name!r} is (a value that is the whole name needs its "
               "span in `spans`)" if next(_unowned(text, values[k], owned), None) else
               "not in the bio (looked for it as a whole word, exactly and case-insensitively)")
      raise ValueError(f"text: the {ATTRIBUTES[k]} value {values[k]!r} is {where}")
    spans[k] = hit
    owned.append(hit)
  return spans


def _spans_field(spans, text: str) -> dict:
  """The record's `spans` as {attribute: (start, end)} (ValueError naming the bad entry)."""
  if not isinstance(spans, dict):
    raise ValueError("spans: expected an object {attribute: [start, end]}")
  out = {}
  for a, se in spans.items():
    if a not in ATTRIBUTES:
      raise ValueError(f"spans.{a}: unknown attribute; expected one of {ATTRIBUTES}")
    if (not isinstance(se, (list, tuple)) or len(se) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in se)
        or not 0 <= se[0] < se[1] <= len(text)):
      raise ValueError(f"spans.{a}: {se!r} is not [start, end] with 0 <= start < end <= "
                       f"{len(text)} (the text's length)")
    out[a] = tuple(se)
  return out


def _check_string(field: str, v: str) -> None:
  """ValueError('<field>: ...') for a string the tokenizer cannot take as text: one UTF-8
  cannot encode (JSON's escapes give lone surrogates: the tokenizer would fail on it later,
  naming no record), or one holding a special token (it would become that token)."""
  try:
    v.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{field}: character {e.start} ({v[e.start]!r}) cannot be encoded as UTF-8 "
                     "(a lone surrogate: an unpaired \\ud800-\\udfff escape?)") from None
  special = next((t for t in SPECIAL_TOKENS if t in v), None)
  if special:
    raise ValueError(f"{field}: holds the tokenizer's special token {special!r} at character "
                     f"{v.index(special)} (it would be tokenised as that token)")


def check_record(rec) -> tuple[tuple, int | None, str, dict]:
  """(person facts (id, name, group, *values), copy or None, text, given spans) of one record;
  ValueError('<field>: ...') for an unknown, missing or ill-typed field."""
  if not isinstance(rec, dict):
    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
  for k in rec:
    if k not in FIELDS:
      raise ValueError(f"{k}: unknown field; expected {', '.join(FIELDS)}")
  for k in REQUIRED:
    if k not in rec:
      raise ValueError(f"{k}: missing")
  for k in ("person", "copy"):
    v = rec.get(k, 0)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < ID_LIMIT:
      raise ValueError(f"{k}: {v!r} is not an integer >= 0 and < 2**63")
  for k in ("name", "group", *ATTRIBUTES, "text"):
    v = rec.get(k, DEFAULT_GROUP)
    if not isinstance(v, str) or not v.strip() or v != v.strip():
      raise ValueError(f"{k}: {v!r} is not a non-empty string without surrounding spaces")
    _check_string(k, v)
  birth_month(rec["birth_date"])   # ValueError('birth_date: ...') here, not at world build
  given = _spans_field(rec.get("spans", {}), rec["text"])
  facts = tuple(rec.get(k, DEFAULT_GROUP) for k in PERSON_FIELDS)
  return facts, rec.get("copy"), rec["text"], given


@dataclasses.dataclass
class Corpus:
  """A checked dataset: its people (first-seen order) and an index of its bios (record order).

  ids [P] the people's `person` ids; names/groups [P] str; values [P] tuples of the six value
  texts; bio_person [B] index into the people; bio_copy [B]; bio_spans [B, 6, 2] character
  spans in the record's text; bio_ref [B] where each record is (reader's key)."""
  where: str
  ids: np.ndarray
  names: list
  groups: list
  values: list
  bio_person: np.ndarray
  bio_copy: np.ndarray
  bio_spans: np.ndarray
  bio_ref: np.ndarray
  reader: object          # .texts(refs) -> list[str]

  def texts(self, bios) -> list[str]:
    """The texts of bios (indices into the record order)."""
    return self.reader.texts(self.bio_ref[np.asarray(bios, np.int64)])

  def training_texts(self, batch: int = 2048):
    """Text to train a tokenizer on (a generator): every bio with the leading space it is
    tokenised with (data/imported.py), every name and value as QA renders it, the questions."""
    for s in range(0, len(self.bio_ref), batch):
      for t in self.texts(np.arange(s, min(s + batch, len(self.bio_ref)))):
        yield t if t[:1].isspace() else " " + t
    yield from sorted({" " + v for n, vals in zip(self.names, self.values) for v in (n, *vals)})
    yield from (q + a for q, a in QUESTIONS.values())


class RecordIndex:
  """Accumulates checked records into a Corpus (one pass; `where(i)` names record i)."""

  def __init__(self, where):
    self.where = where
    self.people: dict[int, int] = {}        # person id -> index
    self.first: list[int] = []              # record number of each person's first record
    self.facts: list[tuple] = []
    self.by_name: dict[str, int] = {}
    self.n_copies: list[int] = []
    self.person, self.copy = array.array("q"), array.array("q")
    self.spans, self.ref, self.recno = array.array("q"), array.array("q"), array.array("q")

  def add(self, i: int, ref: int, rec) -> None:
    try:
      facts, copy, text, given = check_record(rec)
    except ValueError as e:
      raise ConfigError(f"{self.where(i)}: {e}") from None
    pid = facts[0]
    p = self.people.get(pid)
    if p is None:
      other = self.by_name.get(facts[1])
      if other is not None:
        raise ConfigError(f"{self.where(i)}: name: {facts[1]!r} is also the name of person "
                          f"{self.facts[other][0]} ({self.where(self.first[other])}); "
                          "names must be unique")
      p = self.people[pid] = len(self.facts)
      self.by_name[facts[1]] = p
      self.facts.append(facts)
      self.first.append(i)
      self.n_copies.append(0)
    elif self.facts[p] != facts:
      k = next(j for j, (a, b) in enumerate(zip(self.facts[p], facts)) if a != b)
      raise ConfigError(f"{self.where(i)}: {PERSON_FIELDS[k]}: {facts[k]!r} for person {pid}, "
                        f"but {self.facts[p][k]!r} in {self.where(self.first[p])}")
    copy = self.n_copies[p] if copy is None else copy
    self.n_copies[p] += 1
    try:
      spans = locate(text, facts[1], facts[3:], given)
    except ValueError as e:
      raise ConfigError(f"{self.where(i)}: {e}") from None
    self.person.append(p)
    self.copy.append(copy)
    self.spans.extend(spans.ravel().tolist())
    self.ref.append(ref)
    self.recno.append(i)

  def corpus(self, where: str, reader) -> Corpus:
    if not self.facts:
      raise ConfigError(f"{where}: no bio records (empty dataset)")
    person, copy = np.frombuffer(self.person, np.int64), np.frombuffer(self.copy, np.int64)
    order = np.lexsort((np.frombuffer(self.recno, np.int64), copy, person))
    p, c = person[order], copy[order]
    twice = np.flatnonzero((p[1:] == p[:-1]) & (c[1:] == c[:-1]))
    if len(twice):
      j = order[twice[0] + 1]
      raise ConfigError(f"{self.where(self.recno[j])}: copy: person {self.facts[person[j]][0]} "
                        f"has copy {copy[j]} twice")
    rank = np.arange(len(p)) - np.searchsorted(p, p)        # the copy each bio should have
    gap = np.flatnonzero(c != rank)
    if len(gap):
      q = p[gap[0]]
      raise ConfigError(f"{self.where(self.first[q])}: copy: person {self.facts[q][0]} has "
                        f"{self.n_copies[q]} bios but no copy {rank[gap[0]]} (copies must be "
                        f"0..{self.n_copies[q] - 1})")
    by_group: dict[str, int] = {}
    for p, k in enumerate(self.n_copies):
      g = self.facts[p][2]
      first = by_group.setdefault(g, p)
      if self.n_copies[first] != k:
        raise ConfigError(
            f"{where}: group {g!r}: person {self.facts[p][0]} has {k} bios, person "
            f"{self.facts[first][0]} has {self.n_copies[first]} (every person of a group needs "
            "the same number)")
    return Corpus(where=where, ids=np.array([f[0] for f in self.facts], np.int64),
                  names=[f[1] for f in self.facts],
                  groups=[f[2] for f in self.facts], values=[f[3:] for f in self.facts],
                  bio_person=person, bio_copy=copy,
                  bio_spans=np.frombuffer(self.spans, np.int64).reshape(-1, N_ATTR, 2),
                  bio_ref=np.frombuffer(self.ref, np.int64), reader=reader)


class JsonlReader:
  """Random access to a JSON-lines file's records by byte offset (the file mapped once)."""

  def __init__(self, path: str):
    self.path = path
    self._map = None

  def record(self, offset: int) -> dict:
    if self._map is None:
      with open(self.path, "rb") as f:
        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    end = self._map.find(b"\n", offset)
    return json.loads(self._map[offset:end if end >= 0 else len(self._map)])

  def texts(self, refs) -> list[str]:
    return [self.record(int(r))["text"] for r in refs]


def read_jsonl(path: str) -> Corpus:
  """Check and index a JSON-lines file of bio records (blank lines are skipped)."""
  if not os.path.isfile(path):
    raise no_file("data.source", path)
  index = RecordIndex(lambda i: f"{path} line {i + 1}")
  offset = 0
  with open(path, "rb") as f:
    for i, line in enumerate(f):
      if line.strip():
        # JSON or UTF-8 errors, and JSON the parser gives up on: an integer past Python's
        # digit limit (ValueError), nesting past the recursion limit (RecursionError)
        try:
          rec = json.loads(line)
        except (ValueError, RecursionError) as e:
          cut = "" if line.endswith(b"\n") else " (truncated: the file ends inside it)"
          raise ConfigError(f"{path} line {i + 1}: not a JSON object{cut}: {e}") from None
        index.add(i, offset, rec)
      offset += len(line)
  return index.corpus(path, JsonlReader(path))


def write_jsonl(records, path: str) -> int:
  """Write records (dicts) as JSON lines; the number written."""
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for rec in records:
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")
      n += 1
  return n


def _identity(path: str):
  """What says a dataset changed: (size, mtime) of the file, or of every file under a dir."""
  if os.path.isfile(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  return tuple(sorted((os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
                      for d, _, fs in os.walk(path) for f in fs))


def read_source(spec: str) -> Corpus:
  """The checked Corpus of an imported `data.source` (read once per process while the files
  are unchanged: the tokenizer and the world both ask for it)."""
  kind, path = parse_source(spec)
  if kind == GENERATED:
    raise ValueError("data.source='generated' has no records to read")
  if not os.path.exists(path):
    raise ConfigError(f"data.source={spec!r}: no such {'directory' if kind == 'tfds' else 'file'}")
  return _read_cached(kind, os.path.abspath(path), _identity(path))


@functools.lru_cache(maxsize=2)
def _read_cached(kind: str, path: str, identity) -> Corpus:
  del identity   # part of the cache key only
  if kind == "jsonl":
    return read_jsonl(path)
  from kstore_jax.data import tfds_bios
  return tfds_bios.read(path)
