"""Probe examples: bios with the positions before each value (P-probing) or the bare name
(Q-probing), with the attribute labels; served as Grain random-access batches."""

import dataclasses

import numpy as np

from kstore_jax.data.batches import LABELS, PROBE_AT, ROW_WEIGHTS, SEGMENT_IDS, TOKENS
from kstore_jax.data.classes import probe_labels


def pprobe_examples(world, people, copies):
  """Bios of (people[i], copies[i]): inputs [n, W], segment ids, probe_at [n, 6] (the input
  position whose next token is the k-th value in the bio: values sorted by their spans, so
  imported bios in any order and wording too), labels [n, 6]."""
  docs, spans = world.bio_docs(people, copies)
  probe_at = np.sort(spans[..., 0], 1) - 1
  return _pad(docs, world.pad_id), probe_at.astype(np.int32), probe_labels(world.pop, people)


def qprobe_examples(world, people):
  """[EOT] + full name: probe_at = the last name token."""
  r = world.renderer
  pieces = np.concatenate([np.full((len(people), 1), r.bos), r.name_pieces(world.pop, people)],
                          1)
  docs = r.render(pieces, np.zeros(pieces.shape[1], bool))
  return (_pad(docs, world.pad_id), (docs.lengths - 1)[:, None].astype(np.int32),
          probe_labels(world.pop, people))


def _pad(docs, pad_id):
  """(tokens [n, longest], segment ids: 1 on real tokens, 0 on padding)."""
  tokens, lens = docs.padded(pad_id)
  return tokens, (np.arange(tokens.shape[1]) < lens[:, None]).astype(np.int32)


@dataclasses.dataclass
class ProbeBatches:
  """Random-access source: batch b -> a probe batch (batches.py) of batch_size examples in
  `rows` rows (default batch_size; more: zero-weight copies of its first examples, so that a
  batch of any size divides the data-parallel devices and trains as the unpadded one would).

  Examples are (person, bio copy) pairs of `people` (P-probe) or people (Q-probe), read through
  a seeded permutation per epoch; `width` pads every batch to one shape for jit."""
  world: object
  people: np.ndarray
  kind: str              # 'pprobe' | 'qprobe'
  batch_size: int
  width: int
  seed: int
  rows: int = 0          # 0: batch_size

  def __post_init__(self):
    self.n = len(self.people) * (self.world.aug.copies if self.kind == "pprobe" else 1)
    self.rows = self.rows or self.batch_size
    if self.rows < self.batch_size:
      raise ValueError(f"rows={self.rows} < batch_size={self.batch_size}")

  def __len__(self) -> int:
    return 1 << 40

  def __getitem__(self, b: int) -> dict:
    pos = b * self.batch_size + np.arange(self.batch_size)
    epoch, j = np.divmod(pos, self.n)
    idx = np.empty(self.batch_size, np.int64)
    for e in np.unique(epoch):
      sel = epoch == e
      idx[sel] = np.random.default_rng([self.seed, int(e)]).permutation(self.n)[j[sel]]
    pad = np.resize(idx, self.rows - self.batch_size)   # the first examples again
    batch = self.examples(np.concatenate([idx, pad]))
    batch[ROW_WEIGHTS][self.batch_size:] = 0
    return batch

  def examples(self, idx) -> dict:
    if self.kind == "pprobe":
      person, copy = np.divmod(idx, self.world.aug.copies)
      (tokens, seg), at, labels = pprobe_examples(self.world, self.people[person], copy)
    else:
      (tokens, seg), at, labels = qprobe_examples(self.world, self.people[idx])
    pad = self.width - tokens.shape[1]
    return {TOKENS: np.pad(tokens, ((0, 0), (0, pad)), constant_values=self.world.pad_id),
            SEGMENT_IDS: np.pad(seg, ((0, 0), (0, pad))), PROBE_AT: at, LABELS: labels,
            ROW_WEIGHTS: np.ones(len(idx), np.float32)}


def padded_rows(batch_size: int, multiple: int) -> int:
  """The rows of a batch of `batch_size` examples padded up to a multiple of `multiple`."""
  return -(-batch_size // multiple) * multiple


def probe_width(world, kind: str) -> int:
  """Longest probe input of this world (bios: the longest bio; names: the longest name)."""
  if kind == "pprobe":
    return world.max_doc_positions() + 1   # whole documents, both EOTs included
  return 1 + world.renderer.longest_name

