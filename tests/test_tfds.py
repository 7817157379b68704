"""The tfds/array_record corpus: built without TensorFlow, read back equal to the live sources."""

import collections
import json
import pickle
import sys

import numpy as np
import pytest

from configs import base, celeb_minority
from kstore_jax.data import pipeline, tfds_bios, tokenizer
from kstore_jax.data import world as world_lib

N_PEOPLE = 50


def make_world(**data):
  cfg = base.get_config("tiny")
  cfg.data.update(n_people=N_PEOPLE, multi=2, permute=True, **data)
  return world_lib.build_world(cfg, tokenizer.train_tokenizer(cfg.data.vocab_size)), cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  world, cfg = make_world()
  data_dir = tmp_path_factory.mktemp("tfds")
  return world, cfg, data_dir, tfds_bios.build(world, data_dir)


def live_sources(world):
  return {"bios": world.bios(), "qa_train": world.qa(world.train_people),
          "qa_test": world.qa(world.test_people)}


def test_built_without_tensorflow(built):
  assert "tensorflow" not in sys.modules
  _, _, data_dir, builder = built
  assert builder.info.file_format.value == "array_record"
  assert set(builder.info.splits) == set(tfds_bios.SPLITS)
  assert list(data_dir.glob(f"kstore_bios/{tfds_bios.KstoreBios.VERSION}/*.array_record-*"))


@pytest.mark.parametrize("split", tfds_bios.SPLITS)
def test_records_equal_live_sources(built, split):
  world, _, _, builder = built
  live = live_sources(world)[split]
  src = tfds_bios.data_source(builder, split)
  assert len(src) == len(live) == builder.info.splits[split].num_examples
  want = live.docs(np.arange(len(live)))
  people, _ = live.locate(np.arange(len(live)))
  seen = np.zeros(len(live), bool)
  order = []
  for r in range(len(src)):
    rec = src[r]
    i = int(rec["index"])
    assert not seen[i]
    seen[i] = True
    order.append(i)
    d = want.doc(i)
    assert rec["tokens"].dtype == np.int32
    np.testing.assert_array_equal(rec["tokens"], d["tokens"])
    np.testing.assert_array_equal(np.asarray(rec["loss"], bool), d["loss"])
    assert int(rec["person"]) == people[i] and int(rec["group"]) == 0
    assert int(rec["kind"]) == (tfds_bios.KIND_BIO if split == "bios" else tfds_bios.KIND_QA)
    assert rec["text"].decode() == world.renderer.decode(d["tokens"])
  assert seen.all()
  if split == "bios":
    assert order != sorted(order)            # tfds stores records shuffled
  # Reordered by `index`, the corpus is the live source exactly.
  back = src.docs(np.argsort(order))
  np.testing.assert_array_equal(back.tokens, want.tokens)
  np.testing.assert_array_equal(back.loss, want.loss)
  np.testing.assert_array_equal(back.offsets, want.offsets)


def test_qa_splits_are_the_world_split(built):
  world, _, _, builder = built
  train = {int(r["person"]) for r in tfds_bios.data_source(builder, "qa_train").source}
  test = {int(r["person"]) for r in tfds_bios.data_source(builder, "qa_test").source}
  assert train == set(world.train_people.tolist()) and test == set(world.test_people.tolist())
  assert not train & test and len(train | test) == N_PEOPLE


def test_packed_chunks_over_corpus(built):
  world, cfg, _, builder = built
  bios = tfds_bios.data_source(builder, "bios")
  qa = tfds_bios.data_source(builder, "qa_train")
  live = live_sources(world)
  # One epoch of the frozen bios packs into exactly the live bios.
  chunks = pipeline.PackedChunks([bios], [1.0], cfg.data.seq_len, world.pad_id, seed=0,
                                 chunk_docs=len(bios))
  packed = chunks[0]
  assert packed["inputs"].shape[1] == cfg.data.seq_len
  real = packed["segment_ids"] > 0
  assert (packed["weights"][~real] == 0).all()
  want = live["bios"].docs(np.arange(len(live["bios"])))
  assert real.sum() == len(want.tokens) - len(want)

  def row_docs(b):
    out = []
    for r in range(len(b["inputs"])):
      seg = b["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        out.append(tuple(b["inputs"][r][m].tolist()) + (int(b["targets"][r][m][-1]),))
    return collections.Counter(out)

  assert row_docs(packed) == collections.Counter(
      tuple(want.doc(i)["tokens"].tolist()) for i in range(len(want)))
  # A bio/QA mixture through the Grain pipeline.
  mixed = pipeline.PackedChunks([bios, qa], [0.5, 0.5], cfg.data.seq_len, world.pad_id, seed=1,
                                chunk_docs=40)
  batches = list(zip(range(3), pipeline.make_pipeline(mixed, 4)))
  assert all(b["inputs"].shape == (4, cfg.data.seq_len) for _, b in batches)
  qa_docs = {tuple(live["qa_train"].docs([i]).tokens.tolist()) for i in range(len(qa))}
  n_qa = sum(d in qa_docs for d in row_docs(mixed[0]).elements())
  assert n_qa == 20


def test_rebuild_reuses_and_checks_identity(built, tmp_path):
  world, _, data_dir, builder = built
  again = tfds_bios.build(world, data_dir)           # same world: reused, same records
  a, b = tfds_bios.data_source(builder, "bios"), tfds_bios.data_source(again, "bios")
  assert [int(a[i]["index"]) for i in range(len(a))] == [int(b[i]["index"]) for i in range(len(b))]
  version = tfds_bios.KstoreBios.VERSION
  meta = json.loads((data_dir / f"kstore_bios/{version}/metadata.json").read_text())
  assert meta == tfds_bios.world_metadata(world)
  assert meta["n_people"] == N_PEOPLE and list(meta["groups"]) == ["all"]
  assert meta["groups"]["all"]["multi"] == 2 and meta["groups"]["all"]["permute"]
  other, _ = make_world(fullname=True)
  with pytest.raises(ValueError, match="different corpus"):
    tfds_bios.build(other, data_dir)
  with pytest.raises(ValueError, match="unknown split"):
    tfds_bios.data_source(builder, "train")


def test_corpus_source_pickles_for_workers(built):
  # Grain worker processes receive the pipeline pickled; the tfds source must survive it.
  world, cfg, _, builder = built
  chunks = pipeline.PackedChunks([tfds_bios.data_source(builder, "bios")], [1.0],
                                 cfg.data.seq_len, world.pad_id, seed=2, chunk_docs=16)
  clone = pickle.loads(pickle.dumps(chunks))
  for c in range(3):
    for k, v in chunks[c].items():
      np.testing.assert_array_equal(clone[c][k], v, err_msg=k)


def test_grouped_world(tmp_path):
  """celeb_minority at 60 people: 50 minority people with one bio each, then 10 stars with
  five; the bios split holds both groups' bios, group after group, with their group field."""
  cfg = celeb_minority.get_config("tiny")
  cfg.data.update(n_people=60, vocab_size=1024)
  world = world_lib.build_world(cfg, tokenizer.train_tokenizer(cfg.data.vocab_size))
  builder = tfds_bios.build(world, tmp_path)
  assert builder.info.features["group"].names == ["minority", "star"]
  bios = tfds_bios.data_source(builder, "bios")
  minority, star = (world.group_bios(g) for g in world.groups)
  assert len(bios) == len(minority) + len(star) == 100
  recs = sorted((bios[r] for r in range(len(bios))), key=lambda rec: int(rec["index"]))
  assert [int(rec["index"]) for rec in recs] == list(range(100))
  assert [int(rec["group"]) for rec in recs] == [0] * 50 + [1] * 50
  live = [(minority, i) for i in range(50)] + [(star, i) for i in range(50)]
  for rec, (src, i) in zip(recs, live):
    np.testing.assert_array_equal(rec["tokens"], src.docs([i]).doc(0)["tokens"])
    assert int(rec["person"]) == src.locate([i])[0][0]
  qa = tfds_bios.data_source(builder, "qa_test").source
  assert {(int(r["person"]) >= 50, int(r["group"])) for r in qa} == {(False, 0), (True, 1)}
  meta = tfds_bios.world_metadata(world)["groups"]
  assert meta["minority"]["people"] == [0, 50] and meta["star"]["multi"] == 5
