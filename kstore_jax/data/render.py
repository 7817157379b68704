"""Rendering bios and QA as token ids by concatenating pre-tokenised pieces.

Every template fragment, name part and attribute value is tokenised once into a piece table.
The model sees *model ids*: the tokenizer ids that occur in the piece table (plus the special
tokens), renumbered densely. A byte-level BPE keeps every intermediate merge in its vocabulary
(6.5k entries for ~2.5k words here; 50k for GPT-2's), and the output softmax is the largest
matmul of a small model, so this trimming cuts a third of the demo's training FLOPs.
A document is a row of piece ids; rendering gathers and concatenates their tokens, so an
attribute value is the same token sequence wherever it appears (bio, QA answer, probe target),
and spans are exact by construction. All of it is vectorised NumPy over many documents.

Bio layout: [BOS] + 6 sentences x [subj0 subj1 subj2 | mid | v0 v1 v2 v3 | tail] + [EOT].
QA layout:  [BOS, q_prefix, name0, name1, name2, q_suffix, v0, v1, v2, v3, EOT].
"""

import dataclasses
import itertools

import numpy as np
import tokenizers

from kstore_jax.data import hashing
from kstore_jax.data import pools as pools_lib
from kstore_jax.data import templates as templates_lib
from kstore_jax.data.population import FIRST_YEAR, MONTHS, N_DAYS, N_YEARS, Population
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.data.tokenizer import EOT, SPECIAL_TOKENS

N_ATTR = len(ATTRIBUTES)
SUBJ, MID, VAL, TAIL = 0, 3, 4, 8     # slot offsets inside a sentence
SENT = 9                              # pieces per sentence
BIO_PIECES = 2 + N_ATTR * SENT
# A QA pair's pieces: EOT, the question's words before the name, the name (NAME_SLOTS
# pieces: first, middle, last), the words after it, the answer value and EOT (QA_VALUE_SLOTS).
QA_PIECES = 11
NAME_SLOTS = 3
QA_NAME_SLOTS = slice(2, 2 + NAME_SLOTS)
QA_VALUE_SLOTS = slice(6, 11)         # answer value + EOT: the only targets with loss
PERMUTATIONS = np.array(list(itertools.permutations(range(N_ATTR))), np.int8)  # 720 x 6
_PERM_STRIDE = 331                    # coprime with 720: copies of one bio get distinct orders

# Hash purposes, so that independent choices never share a stream.
_H_TEMPLATE, _H_ORDER = 1, 2           # (3, 4: the QA split's, data/world.py)


@dataclasses.dataclass(frozen=True)
class AugSpec:
  """How each person's bios are written (PAPER.md: the 16 bioS rows are settings of this).

  copies = multi * permute_copies bios per person. Copy c uses template draw c // permute_copies
  and, when `permute`, its own sentence order (distinct orders among one draw's copies).
  """
  multi: int = 1
  permute: bool = False
  permute_copies: int = 1
  fullname: bool = False

  @property
  def copies(self) -> int:
    return self.multi * self.permute_copies

  @classmethod
  def from_config(cls, data_cfg) -> "AugSpec":
    return cls(multi=data_cfg.multi, permute=data_cfg.permute,
               permute_copies=data_cfg.permute_copies, fullname=data_cfg.fullname)


@dataclasses.dataclass(frozen=True)
class Docs:
  """A ragged batch of documents: doc i is tokens[offsets[i]:offsets[i+1]].

  `loss[t]` says whether token t is a prediction target (bios: all but BOS; QA: the answer
  value and the EOT).
  """
  tokens: np.ndarray
  loss: np.ndarray
  offsets: np.ndarray

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def padded(self, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [n, longest] and the lengths [n]."""
    lens = self.lengths
    out = np.full((len(lens), int(lens.max())), pad_id, np.int32)
    rows = np.repeat(np.arange(len(lens)), lens)
    cols = np.arange(len(self.tokens)) - np.repeat(self.offsets[:-1], lens)
    out[rows, cols] = self.tokens
    return out, lens.astype(np.int32)

  def doc(self, i: int) -> dict[str, np.ndarray]:
    s = slice(self.offsets[i], self.offsets[i + 1])
    return {"tokens": self.tokens[s], "loss": self.loss[s]}


class Renderer:
  """The piece table for one tokenizer, and vectorised rendering of bios and QA."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, extra_texts=(), extra_ids=()):
    """`extra_texts`: more pieces, from piece `extra0` on (an imported world's names and
    values); `extra_ids`: tokenizer ids the model must know besides the pieces' (an imported
    world's bio text)."""
    self.tokenizer = tokenizer
    eot = tokenizer.token_to_id(EOT)
    p = pools_lib.load_pools()
    temps = templates_lib.load_templates()
    texts: list[str] = [""]  # piece 0 is empty
    special: list[int | None] = [None]

    def add(strings):
      start = len(texts)
      texts.extend(strings)
      special.extend([None] * len(strings))
      return start

    self.bos = len(texts)
    texts.append(EOT)
    special.append(eot)
    self.first0 = add([" " + s for s in p.first_names])
    self.middle0 = add([" " + s for s in p.middle_names])
    self.last0 = add([" " + s for s in p.last_names])
    self.pronoun0 = add([" He", " She"])
    self.month0 = add([" " + m for m in MONTHS])
    self.day0 = add([f" {d + 1}" for d in range(N_DAYS)])
    self.comma = add([","])
    self.year0 = add([f" {FIRST_YEAR + y}" for y in range(N_YEARS)])
    self.value0 = {a: add([" " + v for v in vals]) for a, vals in (
        ("birth_city", p.birth_cities), ("university", p.universities), ("major", p.majors),
        ("company", p.companies), ("company_city", p.hq_cities))}
    self.n_templates = np.array([len(temps[a]) for a in ATTRIBUTES])
    self.mid0 = np.array([add([m for m, _ in temps[a]]) for a in ATTRIBUTES])
    self.tail0 = np.array([add([t for _, t in temps[a]]) for a in ATTRIBUTES])
    self.question0 = add([templates_lib.QUESTIONS[a][0] for a in ATTRIBUTES])
    self.question1 = add([templates_lib.QUESTIONS[a][1] for a in ATTRIBUTES])
    self.extra0 = add(list(extra_texts))

    ids = [[s] if s is not None else tokenizer.encode(t).ids for t, s in zip(texts, special)]
    flat = np.array(list(itertools.chain.from_iterable(ids)), np.int64)
    specials = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    self.tokenizer_ids = np.unique(np.concatenate(   # model id -> tokenizer id
        [flat, specials, np.asarray(extra_ids, np.int64)]))
    self.piece_len = np.array([len(i) for i in ids], np.int64)
    self.piece_start = np.concatenate([[0], np.cumsum(self.piece_len)[:-1]])
    self.piece_tokens = self.to_model_ids(flat)
    self.eot_id = self.token_id(EOT)

  @property
  def vocab_size(self) -> int:
    """Number of model ids."""
    return len(self.tokenizer_ids)

  def to_model_ids(self, tokenizer_ids) -> np.ndarray:
    tokenizer_ids = np.asarray(tokenizer_ids, np.int64)
    pos = np.searchsorted(self.tokenizer_ids, tokenizer_ids).clip(0, self.vocab_size - 1)
    unknown = self.tokenizer_ids[pos] != tokenizer_ids
    if unknown.any():
      bad = self.tokenizer.decode([int(t) for t in tokenizer_ids[unknown][:5]])
      raise ValueError(f"text uses tokens outside the model vocabulary: {bad!r}")
    return pos.astype(np.int32)

  def token_id(self, token: str) -> int:
    """Model id of a special token such as EOT or PAD."""
    return int(self.to_model_ids([self.tokenizer.token_to_id(token)])[0])

  def encode(self, text: str) -> np.ndarray:
    """Free text -> model ids (ValueError if it needs a token the world never uses)."""
    return self.to_model_ids(self.tokenizer.encode(text).ids)

  @property
  def longest_name(self) -> int:
    """Tokens of the longest full name a person can have (the pools' longest first, middle and
    last names together): every Q-probe input fits in [EOT] + this."""
    return int(self.piece_len[self.first0:self.middle0].max()
               + self.piece_len[self.middle0:self.last0].max()
               + self.piece_len[self.last0:self.pronoun0].max())

  # -- piece ids -------------------------------------------------------------------------
  def name_pieces(self, pop: Population, people: np.ndarray) -> np.ndarray:
    """[n, NAME_SLOTS] piece ids of the people's full names (as bios and QA render them)."""
    return np.stack([self.first0 + _take(pop.first, people),
                     self.middle0 + _take(pop.middle, people),
                     self.last0 + _take(pop.last, people)], -1)

  def _value_pieces(self, pop: Population, people: np.ndarray) -> np.ndarray:
    """[n, 6 attributes, 4 slots] value piece ids."""
    n = len(people)
    out = np.zeros((n, N_ATTR, 4), np.int64)
    out[:, 0] = np.stack([self.month0 + _take(pop.birth_month, people),
                          self.day0 + _take(pop.birth_day, people), np.full(n, self.comma),
                          self.year0 + _take(pop.birth_year, people)], -1)
    for a, name in enumerate(ATTRIBUTES[1:], 1):
      out[:, a, 0] = self.value0[name] + _take(pop.attribute(name), people)
    return out

  def bio_pieces(self, pop: Population, people: np.ndarray, copies: np.ndarray,
                 aug: AugSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Piece ids [n, BIO_PIECES] and sentence order [n, 6] of bios (people[i], copies[i])."""
    people = np.asarray(people, np.int64)
    copies = np.asarray(copies, np.int64)
    n = len(people)
    draw = copies // aug.permute_copies
    attrs = np.arange(N_ATTR)
    tmpl = hashing.hash_keys(seed, _H_TEMPLATE, people[:, None], draw[:, None], attrs)
    tmpl = (tmpl % self.n_templates.astype(np.uint64)).astype(np.int64)       # [n, 6]
    if aug.permute:
      base = hashing.uniform_int(len(PERMUTATIONS), seed, _H_ORDER, people, draw)
      order = PERMUTATIONS[(base + (copies % aug.permute_copies) * _PERM_STRIDE)
                           % len(PERMUTATIONS)].astype(np.int64)
    else:
      order = np.broadcast_to(attrs, (n, N_ATTR))
    name = self.name_pieces(pop, people)
    subj = np.zeros((n, N_ATTR, 3), np.int64)
    subj[:, :, 0] = (self.pronoun0 + _take(pop.gender, people))[:, None]
    subj[:, 0] = name
    if aug.fullname:
      subj[:] = name[:, None]
    values = self._value_pieces(pop, people)
    rows = np.arange(n)[:, None]
    sent = np.zeros((n, N_ATTR, SENT), np.int64)
    sent[:, :, SUBJ:MID] = subj
    sent[:, :, MID] = self.mid0[order] + tmpl[rows, order]
    sent[:, :, VAL:TAIL] = values[rows, order]
    sent[:, :, TAIL] = self.tail0[order] + tmpl[rows, order]
    out = np.empty((n, BIO_PIECES), np.int64)
    out[:, 0] = self.bos
    out[:, 1:-1] = sent.reshape(n, N_ATTR * SENT)   # (n = 0 too)
    out[:, -1] = self.bos  # the same EOT token closes the document
    return out, order

  def qa_pieces(self, pop: Population, people: np.ndarray, attrs: np.ndarray) -> np.ndarray:
    """Piece ids [n, QA_PIECES] of the question-answer pairs (people[i], attribute attrs[i])."""
    people = np.asarray(people, np.int64)
    attrs = np.asarray(attrs, np.int64)
    out = np.zeros((len(people), QA_PIECES), np.int64)
    out[:, 0] = self.bos
    out[:, 1] = self.question0 + attrs
    out[:, QA_NAME_SLOTS] = self.name_pieces(pop, people)
    out[:, 5] = self.question1 + attrs
    out[:, 6:10] = self._value_pieces(pop, people)[np.arange(len(people)), attrs]
    out[:, 10] = self.bos
    return out

  # -- tokens ---------------------------------------------------------------------------
  def render(self, pieces: np.ndarray, loss_pieces: np.ndarray) -> Docs:
    """Concatenate the pieces of each row. `loss_pieces` [K] bool marks target pieces."""
    lens = self.piece_len[pieces]                                     # [n, K]
    flat_len = lens.ravel()
    total = int(flat_len.sum())
    piece_out_start = np.cumsum(flat_len) - flat_len
    src = np.repeat(self.piece_start[pieces].ravel() - piece_out_start, flat_len)
    tokens = self.piece_tokens[src + np.arange(total)]
    loss = np.repeat(np.broadcast_to(loss_pieces, pieces.shape).ravel(), flat_len)
    offsets = np.concatenate([[0], np.cumsum(lens.sum(1))])
    return Docs(tokens=tokens, loss=loss, offsets=offsets)

  def value_spans(self, pieces: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[n, 6 attributes, 2] token (start, end) of each attribute's value in bio docs."""
    lens = self.piece_len[pieces]
    cum = np.concatenate([np.zeros((len(pieces), 1), np.int64), np.cumsum(lens, 1)], 1)
    slot = 1 + np.arange(N_ATTR) * SENT + VAL                          # value slot per sentence
    start_by_sent, end_by_sent = cum[:, slot], cum[:, slot + 4]
    spans = np.empty((len(pieces), N_ATTR, 2), np.int64)
    rows = np.arange(len(pieces))[:, None]
    spans[rows, order, 0] = start_by_sent
    spans[rows, order, 1] = end_by_sent
    return spans

  def bio_loss_pieces(self) -> np.ndarray:
    m = np.ones(BIO_PIECES, bool)
    m[0] = False
    return m

  def qa_loss_pieces(self) -> np.ndarray:
    m = np.zeros(QA_PIECES, bool)
    m[QA_VALUE_SLOTS] = True
    return m

  def decode(self, model_ids) -> str:
    ids = self.tokenizer_ids[np.asarray(model_ids, np.int64)]
    return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)


def _take(column: np.ndarray, people: np.ndarray) -> np.ndarray:
  return column[people].astype(np.int64)
