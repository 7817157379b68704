"""The Grain pipeline: packing is lossless, mixing is exact, epochs cover, streams resume."""

import collections
import itertools
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from configs import base
from kstore_jax import configlib
from kstore_jax.data import batches, pipeline, population, render, sources, tokenizer
from kstore_jax.data import world as world_lib
from kstore_jax.data.render import Docs
from kstore_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]

N_PEOPLE = 100
SEQ_LEN = 128
EOT = tokenizer.EOT


@pytest.fixture(scope="module")
def world():
  tok = tokenizer.train_tokenizer(4096)
  renderer = render.Renderer(tok)
  pop = population.make_population(0, N_PEOPLE)
  people = np.arange(N_PEOPLE)
  return dict(
      tok=tok, renderer=renderer, pad=renderer.token_id(tokenizer.PAD),
      bios=sources.BioSource(renderer, pop, people, render.AugSpec(multi=2, permute=True), 0),
      qa=sources.QASource(renderer, pop, people[: N_PEOPLE // 2]),
  )


def chunks_of(world, weights=(1.0,), kinds=("bios",), seed=0, chunk_docs=48, seq_len=SEQ_LEN):
  return pipeline.PackedChunks([world[k] for k in kinds], list(weights), seq_len, world["pad"],
                               seed=seed, chunk_docs=chunk_docs)


def unpack(batch) -> list[tuple[tuple, tuple]]:
  """Documents of packed rows as (tokens, loss of tokens[1:]), checking the row layout."""
  out = []
  for r in range(len(batch["inputs"])):
    seg, pos = batch["segment_ids"][r], batch["positions"][r]
    inp, tgt, w = batch["inputs"][r], batch["targets"][r], batch["weights"][r]
    ids = seg[seg > 0]
    # Segments are contiguous blocks numbered 1, 2, ... from the row start; padding trails.
    n_real = len(ids)
    assert (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all()
    starts = np.flatnonzero(np.diff(np.concatenate([[0], ids])) != 0)
    np.testing.assert_array_equal(ids[starts], np.arange(1, len(starts) + 1))
    for s in np.unique(ids):
      m = np.flatnonzero(seg == s)
      assert (np.diff(m) == 1).all()
      np.testing.assert_array_equal(pos[m], np.arange(len(m)))
      np.testing.assert_array_equal(inp[m][1:], tgt[m][:-1])   # next-token pairs
      out.append((tuple(inp[m].tolist()) + (int(tgt[m][-1]),), tuple(w[m].astype(bool).tolist())))
  return out


def docs_as_pairs(docs: Docs) -> list[tuple[tuple, tuple]]:
  out = []
  for i in range(len(docs)):
    d = docs.doc(i)
    out.append((tuple(d["tokens"].tolist()), tuple(d["loss"][1:].tolist())))
  return out


def take(it, n):
  return [{k: np.array(v) for k, v in b.items()} for b in itertools.islice(it, n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -- packing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [(1.0,), (0.3, 0.7)])
def test_packing_is_lossless(world, weights):
  kinds = ("bios", "qa")[:len(weights)]
  chunks = chunks_of(world, weights, kinds)
  for c in range(4):
    batch = chunks[c]
    docs = chunks.chunk_docs_of(c)
    assert len(docs) == chunks.chunk_docs
    assert set(batch) == set(batches.LM_FIELDS)
    for k in batches.LM_FIELDS:
      assert batch[k].ndim == 2 and batch[k].shape[1] == SEQ_LEN, k
      assert batch[k].dtype == batches.LM_DTYPES[k], k
    got = unpack(batch)
    assert collections.Counter(got) == collections.Counter(docs_as_pairs(docs))
    # No token lost or duplicated: real positions = total tokens - one per document.
    assert (batch["segment_ids"] > 0).sum() == len(docs.tokens) - len(docs)


def test_pack_docs_small_example():
  # Three documents of 4, 3 and 6 tokens into rows of 5 positions.
  toks = [[9, 1, 2, 9], [9, 3, 9], [9, 4, 5, 6, 7, 9]]
  loss = [[0, 1, 1, 1], [0, 0, 1], [0, 1, 1, 1, 1, 1]]
  docs = Docs(tokens=np.array(sum(toks, []), np.int32), loss=np.array(sum(loss, []), bool),
              offsets=np.array([0, 4, 7, 13]))
  out = pipeline.pack_docs(docs, 5, pad_id=0)
  # First fit: doc 0 (3 positions) row 0; doc 1 (2 positions) also fits row 0; doc 2 row 1.
  np.testing.assert_array_equal(out["inputs"], [[9, 1, 2, 9, 3], [9, 4, 5, 6, 7]])
  np.testing.assert_array_equal(out["targets"], [[1, 2, 9, 3, 9], [4, 5, 6, 7, 9]])
  np.testing.assert_array_equal(out["weights"], [[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
  with pytest.raises(ValueError, match="seq_len"):
    pipeline.pack_docs(docs, 4, pad_id=0)


def test_rows_fit_and_padding_is_inert(world):
  chunks = chunks_of(world, (0.5, 0.5), ("bios", "qa"))
  pad = world["pad"]
  saw_padding = False
  for c in range(4):
    b = chunks[c]
    assert b["inputs"].shape[1] == SEQ_LEN
    padding = b["segment_ids"] == 0
    saw_padding |= padding.any()
    assert (b["weights"][padding] == 0).all()
    assert (b["inputs"][padding] == pad).all() and (b["targets"][padding] == pad).all()
    assert (b["positions"][padding] == 0).all()
    assert (b["inputs"][~padding] != pad).all()
    lengths = (b["segment_ids"] > 0).sum(1)
    assert lengths.max() <= SEQ_LEN
    assert_first_fit(b["segment_ids"], SEQ_LEN)
  assert saw_padding


def assert_first_fit(segment_ids, seq_len):
  """First fit, from the packed rows alone: a row's free space only shrinks as documents are
  placed, so a document in row r was longer than the *final* free space of every row before r
  (else it would have gone there)."""
  free = seq_len - (segment_ids > 0).sum(1)
  for r in range(1, len(segment_ids)):
    seg = segment_ids[r]
    shortest = np.bincount(seg[seg > 0])[1:].min()
    assert shortest > free[:r].max(), (r, shortest, free[:r])


def next_fit_rows(n_pos, seq_len) -> int:
  """Reference: next fit (a new row whenever the document does not fit the current one)."""
  rows, free = 0, 0
  for n in n_pos:
    if n > free:
      rows, free = rows + 1, seq_len
    free -= n
  return rows


def first_fit_reference(n_pos, seq_len) -> list[list[int]]:
  """Reference: first fit written plainly: each row's documents in placement order."""
  rows, free = [], []
  for i, n in enumerate(n_pos):
    r = next((r for r, f in enumerate(free) if f >= n), len(rows))
    if r == len(rows):
      rows.append([])
      free.append(seq_len)
    rows[r].append(i)
    free[r] -= n
  return rows


def test_first_fit_packs_fewer_rows_than_next_fit():
  """Long and short documents in random order (a bio-and-QA mix): next fit strands the room a
  long document leaves; first fit fills it with later short ones. The pipeline uses >= 15% fewer
  rows than next fit (128 vs 162; the positions need >= 126), exactly the rows of a plain first
  fit, and places every document once, whole, in one row, a row's documents in input order as
  segments 1, 2, ..."""
  seq_len, n_docs = 100, 400
  rng = np.random.default_rng(0)
  long = rng.random(n_docs) < 0.3
  n_pos = np.where(long, rng.integers(60, 91, n_docs), rng.integers(5, 26, n_docs))
  lengths = n_pos + 1                                   # T tokens -> T - 1 positions
  # document i's tokens: (i + 1) * 1000 + 0, 1, ...: every token names its document and place
  tokens = np.concatenate([(i + 1) * 1000 + np.arange(t) for i, t in enumerate(lengths)])
  docs = Docs(tokens=tokens.astype(np.int32), loss=np.ones(len(tokens), bool),
              offsets=np.concatenate([[0], np.cumsum(lengths)]))
  out = pipeline.pack_docs(docs, seq_len, pad_id=0)
  n_rows = len(out["inputs"])
  lower_bound = -(-int(n_pos.sum()) // seq_len)
  next_fit = next_fit_rows(n_pos, seq_len)
  assert n_rows <= 0.85 * next_fit, (n_rows, next_fit, lower_bound)
  assert n_rows >= lower_bound
  placed = []
  for r in range(n_rows):
    seg, inp, tgt = out["segment_ids"][r], out["inputs"][r], out["targets"][r]
    col, row_docs = 0, []
    for s in range(1, seg.max() + 1):
      m = np.flatnonzero(seg == s)
      assert len(m) and m[0] == col and (np.diff(m) == 1).all(), (r, s)   # one block, in order
      i = int(inp[m[0]]) // 1000 - 1
      whole = (i + 1) * 1000 + np.arange(lengths[i])
      np.testing.assert_array_equal(inp[m], whole[:-1])                    # whole document
      np.testing.assert_array_equal(tgt[m], whole[1:])
      np.testing.assert_array_equal(out["positions"][r][m], np.arange(n_pos[i]))
      row_docs.append(i)
      col += len(m)
    assert (seg[col:] == 0).all() and (inp[col:] == 0).all()
    assert row_docs == sorted(row_docs), (r, row_docs)
    placed.append(row_docs)
  assert sorted(sum(placed, [])) == list(range(n_docs))                     # each exactly once
  assert placed == first_fit_reference(n_pos.tolist(), seq_len)
  assert_first_fit(out["segment_ids"], seq_len)


def test_qa_weights_are_answer_and_eot(world):
  chunks = chunks_of(world, (1.0,), ("qa",), chunk_docs=60)
  n = 0
  for c in range(3):
    b = chunks[c]
    for r in range(len(b["inputs"])):
      seg = b["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        toks = list(b["inputs"][r][m]) + [b["targets"][r][m][-1]]
        text = world["renderer"].decode(toks)
        prompt, answer = text.split("\nAnswer:")
        assert prompt.startswith(EOT) and answer.endswith(EOT)
        weighted = b["targets"][r][m][b["weights"][r][m] > 0]
        assert world["renderer"].decode(weighted) == answer
        assert weighted[-1] == world["renderer"].eot_id
        assert set(np.unique(b["weights"][r][m])) <= {0.0, 1.0}
        n += 1
  assert n == 3 * 60


def test_bio_weights_are_all_but_bos(world):
  b = chunks_of(world)[0]
  real = b["segment_ids"] > 0
  assert (b["weights"][real] == 1).all()


# -- determinism, mixing, epochs -------------------------------------------------------------

def test_same_seed_same_batches(world):
  a = chunks_of(world, (0.5, 0.5), ("bios", "qa"), seed=3)
  b = chunks_of(world, (0.5, 0.5), ("bios", "qa"), seed=3)
  c = chunks_of(world, (0.5, 0.5), ("bios", "qa"), seed=4)
  assert_batches_equal([a[i] for i in range(3)], [b[i] for i in range(3)])
  # Random access in any order gives the same chunk.
  assert_batches_equal([a[5], a[2]], [b[5], b[2]])
  for i in range(3):
    assert not np.array_equal(a[i]["inputs"], c[i]["inputs"])
  sa = take(iter(pipeline.make_pipeline(a, 8)), 4)
  sb = take(iter(pipeline.make_pipeline(b, 8)), 4)
  sc = take(iter(pipeline.make_pipeline(c, 8)), 4)
  assert_batches_equal(sa, sb)
  assert all(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(sa, sc))


@pytest.mark.parametrize("weights,chunk_docs", [((1, 1), 10), ((0.2, 0.8), 48), ((1, 2, 3), 7),
                                                ((0.0, 1.0), 5), ((1 / 3, 2 / 3), 100)])
def test_mix_counts_exact(weights, chunk_docs):
  counts = pipeline.mix_counts(weights, chunk_docs)
  exact = np.asarray(weights) / np.sum(weights) * chunk_docs
  assert counts.sum() == chunk_docs
  assert (np.abs(counts - exact) < 1).all()
  assert ((counts == np.floor(exact)) | (counts == np.ceil(exact))).all()


def test_mix_counts_rejects_bad_weights():
  with pytest.raises(ValueError):
    pipeline.mix_counts([0, 0], 10)
  with pytest.raises(ValueError):
    pipeline.mix_counts([-1, 2], 10)


@pytest.mark.parametrize("qa_ratio, refused", [(0.0004, True), (0.9995, True), (0.001, False),
                                              (0.0, False)])
def test_a_qa_ratio_under_one_document_per_chunk_is_refused(qa_ratio, refused):
  """mix_counts gives a source round(weight x chunk_docs) documents a chunk, so pretrain_mixed
  with 0.0004 x 1024 QA pairs (or 0.0005 x 1024 bios) would never read them: the world
  refuses it before anything is written, only where pretrain_mixed runs."""
  cfg = base.get_config("tiny,mixed")
  cfg.data.qa_ratio = qa_ratio
  configlib.validate(cfg, 1, platform="cpu")
  tok = tokenizer.get_tokenizer(cfg.data)
  if refused:
    with pytest.raises(ConfigError, match=rf"^data.qa_ratio={qa_ratio}: a pretrain_mixed chunk "
                                          r"of data.chunk_docs=1024 documents would hold "):
      world_lib.build_world(cfg, tok)
  else:
    assert min(world_lib.build_world(cfg, tok).chunks("pretrain_mixed", cfg.data).counts) \
        >= (qa_ratio > 0)
  cfg.stages = ("pretrain", "finetune")
  world_lib.build_world(cfg, tok)


@pytest.mark.parametrize("qa_ratio", [0.8, 0.25])
def test_mixing_gives_configured_qa_fraction(world, qa_ratio):
  chunk_docs = 40
  chunks = chunks_of(world, (1 - qa_ratio, qa_ratio), ("bios", "qa"), chunk_docs=chunk_docs)
  want = int(round(qa_ratio * chunk_docs))
  np.testing.assert_array_equal(chunks.counts, [chunk_docs - want, want])
  for c in range(3):
    texts = [world["renderer"].decode(t) for t, _ in unpack(chunks[c])]
    n_qa = sum("\nAnswer:" in t for t in texts)
    assert len(texts) == chunk_docs and n_qa == want
    refs = dict(chunks.doc_refs(c))
    assert len(refs[0]) == chunk_docs - want and len(refs[1]) == want


def test_every_bio_once_per_epoch(world):
  bios = world["bios"]
  chunk_docs = 48            # does not divide len(bios) = 200: chunks straddle epochs
  chunks = chunks_of(world, chunk_docs=chunk_docs)
  n_chunks = -(-2 * len(bios) // chunk_docs) + 1
  stream = np.concatenate([dict(chunks.doc_refs(c))[0] for c in range(n_chunks)])
  for e in range(2):
    epoch = stream[e * len(bios):(e + 1) * len(bios)]
    np.testing.assert_array_equal(np.sort(epoch), np.arange(len(bios)))
  assert not np.array_equal(stream[:len(bios)], stream[len(bios):2 * len(bios)])
  # The packed documents are those bios.
  got = collections.Counter(itertools.chain.from_iterable(
      unpack(chunks[c]) for c in range(len(bios) // chunk_docs)))
  want = collections.Counter(docs_as_pairs(bios.docs(stream[:len(bios) // chunk_docs
                                                           * chunk_docs])))
  assert got == want


def test_epochs_of_mixed_sources_are_independent(world):
  chunks = chunks_of(world, (0.5, 0.5), ("bios", "qa"), chunk_docs=50)
  qa = world["qa"]
  stream = np.concatenate([dict(chunks.doc_refs(c))[1] for c in range(2 * len(qa) // 25)])
  for e in range(2):
    np.testing.assert_array_equal(np.sort(stream[e * len(qa):(e + 1) * len(qa)]),
                                  np.arange(len(qa)))


# -- the Grain iterator: resume, workers, processes -----------------------------------------

def test_batches_have_global_batch_rows(world):
  ds = pipeline.make_pipeline(chunks_of(world), 8)
  for b in take(iter(ds), 5):
    assert set(b) == set(batches.LM_FIELDS)
    assert all(v.shape == (8, SEQ_LEN) for v in b.values())
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_pipeline(chunks_of(world), 6, process_count=4)


def test_resume_continues_on_next_batch(world):
  chunks = chunks_of(world, (0.5, 0.5), ("bios", "qa"), chunk_docs=32)
  ref = take(iter(pipeline.make_pipeline(chunks, 8)), 12)
  for k in (0, 1, 5, 7):
    it = iter(pipeline.make_pipeline(chunks, 8))
    take(it, k)
    state = it.get_state()
    fresh = iter(pipeline.make_pipeline(chunks_of(world, (0.5, 0.5), ("bios", "qa"),
                                                  chunk_docs=32), 8))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), ref[k:k + 3])
    assert_batches_equal(take(it, 3), ref[k:k + 3])


def test_workers_stream_and_resume(world):
  flags.FLAGS.mark_as_parsed()
  chunks = chunks_of(world, (0.5, 0.5), ("bios", "qa"), chunk_docs=32)
  ref = take(iter(pipeline.make_pipeline(chunks, 8)), 10)
  # 0 workers == 2 workers.
  it = iter(pipeline.make_pipeline(chunks, 8, workers=2))
  first = take(it, 4)
  assert_batches_equal(first, ref[:4])
  state = it.get_state()
  assert_batches_equal(take(it, 3), ref[4:7])       # the uninterrupted continuation
  del it
  # Resume from the state of a worker iterator, in a fresh worker iterator.
  fresh = iter(pipeline.make_pipeline(chunks, 8, workers=2))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), ref[4:7])
  # Note: Grain's state layout depends on the worker count (mp_prefetch wraps the parent
  # state), so a state restores only into a pipeline with the same number of workers.


def test_process_sharding(world):
  chunks = chunks_of(world, (0.5, 0.5), ("bios", "qa"), chunk_docs=32)
  whole = take(iter(pipeline.make_pipeline(chunks, 8)), 5)
  halves = [take(iter(pipeline.make_pipeline(chunks, 8, process_index=p, process_count=2)), 5)
            for p in range(2)]
  for g, h0, h1 in zip(whole, *halves):
    for k in batches.LM_FIELDS:
      assert h0[k].shape == h1[k].shape == (4, SEQ_LEN)
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), g[k])
    # Disjoint: no row is in both halves.
    rows0 = {r.tobytes() for r in h0["inputs"]}
    assert not rows0 & {r.tobytes() for r in h1["inputs"]}


def test_chunks_are_thread_safe(world):
  import sys
  from concurrent.futures import ThreadPoolExecutor
  tiny = sources.BioSource(world["renderer"], population.make_population(0, 3), np.arange(3),
                           render.AugSpec(), 0)
  serial = pipeline.PackedChunks([tiny], [1.0], SEQ_LEN, world["pad"], seed=0, chunk_docs=7)
  want = [dict(serial.doc_refs(c))[0] for c in range(20_000)]
  chunks = pipeline.PackedChunks([tiny], [1.0], SEQ_LEN, world["pad"], seed=0, chunk_docs=7)
  old = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)     # many thread switches: chunks straddle epochs constantly
  try:
    with ThreadPoolExecutor(16) as ex:
      got = list(ex.map(lambda c: dict(chunks.doc_refs(c))[0], range(20_000)))
  finally:
    sys.setswitchinterval(old)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_process_slice_takes_rows_of_any_batch_layout():
  """Each of 2 processes keeps its half of the rows of an LM batch and of a probe batch
  (tokens, segment_ids, probe_at, labels, row_weights: no `inputs` field); the halves rebuild the batch."""
  rng = np.random.default_rng(0)
  lm = {k: rng.integers(0, 9, (8, 16)) for k in batches.LM_FIELDS}
  probe = {batches.TOKENS: rng.integers(0, 9, (8, 16)),
           batches.SEGMENT_IDS: np.ones((8, 16), np.int32),
           batches.PROBE_AT: rng.integers(0, 16, (8, 6)), batches.LABELS: rng.integers(0, 5, (8, 6)),
           batches.ROW_WEIGHTS: np.array([1] * 7 + [0], np.float32)}
  assert set(probe) == set(batches.PROBE_FIELDS)
  for batch in (lm, probe):
    halves = [pipeline.ProcessSlice(i, 2)(batch) for i in range(2)]
    for k, v in batch.items():
      assert all(len(h[k]) == 4 for h in halves)
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v)


CTRL_C_TO_THE_GROUP = """
import os, signal, sys, time
from absl import flags
from kstore_jax.data import pipeline
caught = []
def main():
  signal.signal(signal.SIGINT, lambda s, f: caught.append(s))   # the loop's: a flag only
  it = iter(pipeline._read(list(range(10_000)), workers=1))
  first = next(it)
  os.killpg(os.getpgid(0), signal.SIGINT)                      # what Ctrl-C in a terminal does
  time.sleep(2)
  rest = [next(it) for _ in range(20)]
  print("ok", caught == [signal.SIGINT], first, rest[-1])
if __name__ == "__main__":
  flags.FLAGS(sys.argv)
  os.setpgrp()   # its own process group: only this process and its worker get the signal
  main()
"""


def test_a_ctrl_c_to_the_process_group_spares_the_workers(tmp_path):
  """Ctrl-C (or SLURM's SIGTERM) reaches the whole process group: a Grain worker it killed
  made the trainer's next batch raise ('Worker process was terminated unexpectedly') before
  the trainer could save. The workers ignore it; the trainer's handler alone sees it."""
  script = tmp_path / "ctrl_c.py"
  script.write_text(CTRL_C_TO_THE_GROUP)
  r = subprocess.run([sys.executable, str(script)], cwd=str(ROOT), capture_output=True,
                     text=True, timeout=120, check=False)
  assert r.returncode == 0 and r.stdout.split()[:2] == ["ok", "True"], r.stdout + r.stderr[-2000:]
  assert r.stdout.split()[2:] == ["0", "20"], r.stdout
