"""The Grain training pipeline: shuffle per epoch -> mix by ratio -> pack -> batch -> shard.

    grain.MapDataset.source(PackedChunks)      chunk c -> packed rows [R_c, L] (vectorised)
      .to_iter_dataset()
      [.mp_prefetch(workers)]                  chunks rendered in worker processes
    RebatchIterDataset(global_batch)           rows -> global batches (state = chunk + row)
      .map(ProcessSlice)                       this process's rows of the global batch

A chunk takes a fixed number of documents from each source (its mixing weight times
`chunk_docs`, largest-remainder rounded), read through that source's seeded permutation for the
current epoch of that source, then shuffles them together and first-fit packs them into
`seq_len` windows without splitting a document. Everything is a pure function of
(seed, chunk index), so the stream is the same with 0 or N workers and any process count, and
Grain's iterator state (a chunk index and a row offset) resumes it exactly. For a bidirectional
model (GBERT) a chunk's documents are masked (masking.py, also a function of (seed, chunk)) and
packed as same-position (masked input, original target) pairs instead of next-token pairs.
"""

import collections
import dataclasses
import signal
import sys

import grain
import numpy as np

from kstore_jax.data import masking
from kstore_jax.data.batches import (INPUTS, LM_DTYPES, POSITIONS, SEGMENT_IDS, TARGETS,
                                     WEIGHTS)
from kstore_jax.data.render import Docs


def mix_counts(weights, chunk_docs: int) -> np.ndarray:
  """Documents per chunk from each source: proportional to weights, summing to chunk_docs."""
  w = np.asarray(weights, np.float64)
  if (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {list(weights)}")
  exact = w / w.sum() * chunk_docs
  counts = np.floor(exact).astype(np.int64)
  short = chunk_docs - counts.sum()
  counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
  return counts


def first_fit(n_pos: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Place documents (in order) into the first row with room: (row, column, n_rows)."""
  row = np.empty(len(n_pos), np.int64)
  col = np.empty(len(n_pos), np.int64)
  free = np.empty(len(n_pos), np.int64)
  n_rows = 0
  for i, n in enumerate(n_pos.tolist()):
    fits = np.flatnonzero(free[:n_rows] >= n)
    r = int(fits[0]) if len(fits) else n_rows
    if r == n_rows:
      free[r] = seq_len
      n_rows += 1
    row[i], col[i] = r, seq_len - free[r]
    free[r] -= n
  return row, col, n_rows


def pack_docs(docs: Docs, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """First-fit pack documents into rows of `seq_len` (next-token pairs), never splitting one.

  A document of T tokens gives T-1 (input, target) positions. Outputs the LM batch fields
  (batches.py), [R, L] each.
  """
  not_last = np.ones(len(docs.tokens), bool)
  not_last[docs.offsets[1:] - 1] = False
  not_first = np.ones(len(docs.tokens), bool)
  not_first[docs.offsets[:-1]] = False
  return pack_positions(docs.lengths - 1, {
      INPUTS: docs.tokens[not_last], TARGETS: docs.tokens[not_first],
      WEIGHTS: docs.loss[not_first]}, seq_len, pad_id)


def pack_positions(n_pos: np.ndarray, fields: dict[str, np.ndarray], seq_len: int,
                   pad_id: int) -> dict[str, np.ndarray]:
  """First-fit pack documents of n_pos[i] positions each, given the flat per-position
  `inputs`, `targets`, `weights`; adds segment_ids and positions (see pack_docs)."""
  if len(n_pos) and n_pos.max() > seq_len:
    raise ValueError(f"data.seq_len={seq_len} is shorter than a document of {n_pos.max()} "
                     "positions")
  row, col, n_rows = first_fit(n_pos, seq_len)
  local = np.arange(int(n_pos.sum())) - np.repeat(np.cumsum(n_pos) - n_pos, n_pos)
  dest = np.repeat(row * seq_len + col, n_pos) + local
  by_row = np.argsort(row * seq_len + col, kind="stable")
  segment = np.empty(len(n_pos), np.int64)
  segment[by_row] = np.arange(len(n_pos)) - np.searchsorted(row[by_row], row[by_row]) + 1
  out = {k: np.full(n_rows * seq_len, pad_id if k in (INPUTS, TARGETS) else 0, dtype)
         for k, dtype in LM_DTYPES.items()}
  for k, v in fields.items():
    out[k][dest] = v
  out[SEGMENT_IDS][dest] = np.repeat(segment, n_pos)
  out[POSITIONS][dest] = local
  return {k: v.reshape(n_rows, seq_len) for k, v in out.items()}


@dataclasses.dataclass
class PackedChunks:
  """Random-access source of packed chunks: index c -> dict of [R_c, seq_len] arrays."""
  sources: list
  weights: list
  seq_len: int
  pad_id: int
  seed: int
  chunk_docs: int = 1024
  mlm: masking.MlmSpec | None = None   # set: masked-LM rows (masking.py), not next-token

  def __post_init__(self):
    self.counts = mix_counts(self.weights, self.chunk_docs)
    for s, n in zip(self.sources, self.counts):
      if n and not len(s):
        raise ValueError(f"empty data source {s!r} has mixing weight > 0")
    self._perms = collections.OrderedDict()

  def __len__(self) -> int:
    return sys.maxsize // (2 * self.chunk_docs)   # endless; steps decide when to stop

  def _perm(self, k: int, epoch: int) -> np.ndarray:
    """Source k's order in `epoch` (a small LRU cache; Grain reads chunks from threads)."""
    key = (k, epoch)
    perm = self._perms.get(key)
    if perm is None:
      perm = np.random.default_rng([self.seed, k, epoch]).permutation(len(self.sources[k]))
      self._perms[key] = perm
      while len(self._perms) > 2 * len(self.sources):
        try:
          self._perms.popitem(last=False)
        except KeyError:   # another thread evicted it first
          break
    return perm

  def doc_refs(self, chunk: int) -> list[tuple[int, np.ndarray]]:
    """(source, indices) of the chunk's documents, before the in-chunk shuffle."""
    refs = []
    for k, n in enumerate(self.counts):
      if not n:
        continue
      pos = chunk * int(n) + np.arange(n)
      epoch, j = np.divmod(pos, len(self.sources[k]))
      idx = np.empty(n, np.int64)
      for e in np.unique(epoch):
        sel = epoch == e
        idx[sel] = self._perm(k, int(e))[j[sel]]
      refs.append((k, idx))
    return refs

  def chunk_docs_of(self, chunk: int) -> Docs:
    parts = [self.sources[k].docs(idx) for k, idx in self.doc_refs(chunk)]
    order = np.random.default_rng([self.seed, 0xC4, chunk]).permutation(self.chunk_docs)
    return _take_docs(_concat_docs(parts), order)

  def __getitem__(self, chunk: int) -> dict[str, np.ndarray]:
    docs = self.chunk_docs_of(chunk)
    if self.mlm is None:
      return pack_docs(docs, self.seq_len, self.pad_id)
    inputs, weights = masking.mask_docs(docs, self.mlm, self.seed, chunk)
    return pack_positions(docs.lengths, {INPUTS: inputs, TARGETS: docs.tokens,
                                         WEIGHTS: weights}, self.seq_len, self.pad_id)


def _concat_docs(parts: list[Docs]) -> Docs:
  if len(parts) == 1:
    return parts[0]
  lens = np.concatenate([p.lengths for p in parts])
  return Docs(tokens=np.concatenate([p.tokens for p in parts]),
              loss=np.concatenate([p.loss for p in parts]),
              offsets=np.concatenate([[0], np.cumsum(lens)]))


def _take_docs(docs: Docs, order: np.ndarray) -> Docs:
  lens = docs.lengths[order]
  src = np.repeat(docs.offsets[:-1][order] - (np.cumsum(lens) - lens), lens)
  src = src + np.arange(int(lens.sum()))
  return Docs(tokens=docs.tokens[src], loss=docs.loss[src],
              offsets=np.concatenate([[0], np.cumsum(lens)]))


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
  """Keep this process's contiguous block of rows of a global batch, whatever its layout
  (every field's leading axis is the batch row: LM batches, probe batches; batches.py)."""
  index: int
  count: int

  def __call__(self, batch):
    n = len(next(iter(batch.values()))) // self.count
    return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}


def _read(source, workers: int) -> grain.IterDataset:
  # Elements are large (a chunk or a batch, ~1 MB): read them with few threads and a short
  # prefetch (Grain's defaults, 16 threads x 500 elements, are meant for small records).
  read = grain.ReadOptions(num_threads=0 if workers else 1,
                           prefetch_buffer_size=1 if workers else 4)
  ds = grain.MapDataset.source(source).to_iter_dataset(read)
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=_ignore_stop_signals)
  return ds


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """A Grain worker ignores SIGINT and SIGTERM: they go to the whole process group (Ctrl-C,
  SLURM), and a worker they killed made the trainer's next batch raise before it could save;
  the trainer saves and stops, and Grain ends its workers with it. (No parent-death signal:
  Grain starts workers from a thread of its own, and the kernel sends that signal when the
  starting thread ends, which a restarted iterator's thread does.)"""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _slice(ds: grain.IterDataset, global_batch: int, process_index: int,
           process_count: int) -> grain.IterDataset:
  if global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} is not divisible by {process_count} processes")
  return ds.map(ProcessSlice(process_index, process_count)) if process_count > 1 else ds


def make_pipeline(chunks: PackedChunks, global_batch: int, workers: int = 0,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The LM batch stream (batches.py): [global_batch // process_count, seq_len] per field."""
  ds = grain.experimental.RebatchIterDataset(_read(chunks, workers), batch_size=global_batch,
                                             drop_remainder=True)
  return _slice(ds, global_batch, process_index, process_count)


def batch_pipeline(batches, global_batch: int, workers: int = 0, process_index: int = 0,
                   process_count: int = 1) -> grain.IterDataset:
  """A stream from a random-access source of whole global batches (e.g. probe batches,
  batches.py)."""
  return _slice(_read(batches, workers), global_batch, process_index, process_count)
