"""Export and import of bio records: a world exported (JSON lines or tfds/array_record, without
TensorFlow) and imported with its tokenizer gives the generator's people, bios, QA and batches."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import runs

from configs import base, celeb_minority
from kstore_jax.data import export, pipeline, records, tokenizer
from kstore_jax.data import world as world_lib
from kstore_jax.data.templates import ATTRIBUTES

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_PEOPLE = 50


def make_world(cfg):
  return world_lib.build_world(cfg, tokenizer.get_tokenizer(cfg.data))


def imported(cfg, spec, out_dir):
  """cfg reading `spec` with the exported tokenizer."""
  c = cfg.copy_and_resolve_references()
  c.data.update(source=spec, tokenizer_path=str(out_dir / export.TOKENIZER))
  return c


@pytest.fixture(scope="module")
def generated():
  cfg = base.get_config("tiny")
  cfg.data.update(n_people=N_PEOPLE, multi=2, permute=True, permute_copies=2, vocab_size=1024,
                  seq_len=256)
  return cfg, make_world(cfg)


@pytest.fixture(scope="module", params=export.FORMATS)
def exported(generated, request, tmp_path_factory):
  cfg, world = generated
  out = tmp_path_factory.mktemp(request.param)
  spec = export.export(world, str(out), request.param)
  return spec, out


def batches(world, cfg, stage, n=4):
  chunks = world.chunks(stage, cfg.data)
  it = iter(pipeline.make_pipeline(chunks, 8))
  return [next(it) for _ in range(n)]


def test_round_trip_gives_the_generators_batches(generated, exported):
  cfg, world = generated
  spec, out = exported
  c = imported(cfg, spec, out)
  back = make_world(c)
  assert len(back.pop) == N_PEOPLE and back.renderer.vocab_size == world.renderer.vocab_size
  assert [(g.name, g.start, g.stop, g.aug.copies) for g in back.groups] == [("all", 0, 50, 4)]
  np.testing.assert_array_equal(back.qa_train, world.qa_train)
  for p in range(N_PEOPLE):
    assert back.pop.full_name(p) == world.pop.full_name(p)
    assert back.pop.values(p) == world.pop.values(p)
  idx = np.arange(len(world.bios()))
  a, b = world.bios().docs(idx), back.bios().docs(idx)
  for k in ("tokens", "loss", "offsets"):
    np.testing.assert_array_equal(getattr(b, k), getattr(a, k), err_msg=k)
  np.testing.assert_array_equal(back.bios().spans(idx), world.bios().spans(idx))
  for stage in ("pretrain", "finetune", "pretrain_mixed"):
    for x, y in zip(batches(world, cfg, stage), batches(back, c, stage)):
      for k in x:
        np.testing.assert_array_equal(y[k], x[k], err_msg=f"{stage} {k}")
  assert back.doc_positions == world.doc_positions


def test_records_hold_text_and_exact_spans(generated, exported):
  cfg, world = generated
  spec, _ = exported
  corpus = records.read_source(spec)
  assert len(corpus.bio_ref) == len(world.bios()) == N_PEOPLE * 4
  texts = corpus.texts(np.arange(len(corpus.bio_ref)))
  for i in range(len(texts)):
    p = int(corpus.ids[corpus.bio_person[i]])
    values = world.pop.values(p)
    assert texts[i].startswith(world.pop.full_name(p))
    for k, a in enumerate(ATTRIBUTES):
      s, e = corpus.bio_spans[i, k]
      assert texts[i][s:e] == values[a]
  if spec.startswith("tfds:"):
    assert "tensorflow" not in sys.modules
    order = [int(r) for r in corpus.bio_ref]
    people = corpus.ids[corpus.bio_person].tolist()
    assert people != sorted(people) and order == sorted(order)   # tfds stores them shuffled
    assert list(pathlib.Path(spec[5:]).glob("kstore_bios/2.0.0/*.array_record-*"))


def test_export_refuses_a_used_directory(generated, exported):
  _, world = generated
  _, out = exported
  with pytest.raises(records.ConfigError, match="holds an export already"):
    export.export(world, str(out), "jsonl")


def test_tokenizer_trained_on_the_imported_text(generated, exported):
  cfg, world = generated
  spec, out = exported
  c = imported(cfg, spec, out)
  c.data.tokenizer_path = ""
  back = make_world(c)
  # another tokenizer, the same texts: every bio and QA decodes to the generator's
  idx = np.arange(0, len(world.bios()), 7)
  a, b = world.bios().docs(idx), back.bios().docs(idx)
  assert [back.renderer.decode(b.doc(i)["tokens"]) for i in range(len(idx))] == \
         [world.renderer.decode(a.doc(i)["tokens"]) for i in range(len(idx))]
  qa = np.arange(6 * 5)
  assert back.renderer.decode(back.qa(np.arange(5)).docs(qa).tokens) == \
         world.renderer.decode(world.qa(np.arange(5)).docs(qa).tokens)


def test_grouped_world_round_trip(tmp_path):
  """celeb_minority at 60 people: 50 minority people with one bio each, 10 stars with five;
  the groups come back from the records' `group` field with data.groups' shares."""
  cfg = celeb_minority.get_config("tiny")
  cfg.data.update(n_people=60, vocab_size=1024, seq_len=256)
  world = make_world(cfg)
  spec = export.export(world, str(tmp_path), "tfds")
  c = imported(cfg, spec, tmp_path)
  back = make_world(c)
  assert [(g.name, g.start, g.stop, g.aug.copies) for g in back.groups] == \
         [("minority", 0, 50, 1), ("star", 50, 60, 5)]
  np.testing.assert_array_equal(back.qa_train, world.qa_train)
  for x, y in zip(batches(world, cfg, "pretrain"), batches(back, c, "pretrain")):
    for k in x:
      np.testing.assert_array_equal(y[k], x[k], err_msg=k)
  c.data.groups = base.ml_collections.ConfigDict({"star": base.group(1.0, 1.0, 0.5)})
  with pytest.raises(records.ConfigError, match=r"must be the groups of the dataset"):
    make_world(c)


def test_an_older_export_asks_for_a_re_export(tmp_path):
  """A kstore_bios 1.x dataset (token ids, no people's facts) is refused in one line."""
  import tensorflow_datasets as tfds
  from kstore_jax.data import tfds_bios

  class KstoreBios(tfds_bios.KstoreBios, skip_registration=True):   # the name: its directory
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "text": tfds.features.Text()}))

    def _generate_examples(self):
      yield 0, {"tokens": np.arange(5, dtype=np.int32), "text": "x"}

  KstoreBios(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  with pytest.raises(records.ConfigError, match=r"kstore_bios/1.0.0 is a kstore_bios 1.0.0 "
                     r"dataset, not kstore_bios 2.0.0 text records \(missing: person, .*\): "
                     r"re-export") as e:
    records.read_source(f"tfds:{tmp_path}")
  assert "\n" not in str(e.value)


def test_export_command_and_import_by_config(tmp_path):
  out = tmp_path / "jsonl"
  r = subprocess.run([runs.python(), "-m", "kstore_jax.data", "--config=configs/tiny.py",
                      "--config.data.n_people=20", f"--export={out}", "--format=jsonl"],
                     cwd=ROOT, env=runs.env(), capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 0, r.stderr
  spec = f"jsonl:{out / export.JSONL}"
  assert repr(spec) in r.stdout and (out / export.TOKENIZER).exists()
  lines = (out / export.JSONL).read_text().splitlines()
  assert len(lines) == 20 * 5 and set(json.loads(lines[0])) == set(records.FIELDS)
  r = subprocess.run([runs.python(), "-m", "kstore_jax.data", "--config=configs/tiny.py",
                      f"--config.data.source={spec}", "--show=1", "--split=bios"],
                     cwd=ROOT, env=runs.env(), capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 0, r.stderr
  assert json.loads(lines[0])["text"] in r.stdout
