"""A tensorflow-datasets builder that freezes a population's bios and QA pairs to array_record.

For users who want a fixed, shareable corpus (or to bring their own text): the builder writes
every bio of every group of the World, each group's bios as its augmentation spec says (split
`bios`: the groups' bios one group after another), and the six QA pairs of every QA-train /
QA-test person (splits `qa_train`, `qa_test`) as records

    tokens  int32 [T]   the document's token ids (BOS ... EOT), as the Renderer makes them
    loss    bool  [T]   per-token prediction-target mask (bios: all but BOS; QA: answer + EOT)
    kind    int8        0 = bio, 1 = QA
    person  int64       population index of the person
    group   ClassLabel  the person's group (World.groups; names: 'all' without data.groups)
    index   int64       index of the document in its split (bios: group sources concatenated)
    text    Text        the decoded document (special tokens kept)

tfds writes records in a hashed (shuffled) order; `index` says where each came from, so a
corpus can be compared with (or reordered like) the live sources. Read back with
`data_source(builder, split)`, which gives a `sources.ItemSource` that `PackedChunks` packs
like any other source. TensorFlow is not needed (nor imported) to build or read it.

    builder = tfds_bios.build(world, data_dir)            # materialises once, then reuses
    bios = tfds_bios.data_source(builder, "bios")
    chunks = pipeline.PackedChunks([bios], [1.0], seq_len, world.pad_id, seed)
"""

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from kstore_jax.data import sources

SPLITS = ("bios", "qa_train", "qa_test")
KIND_BIO, KIND_QA = 0, 1
_RENDER_BATCH = 4096   # documents rendered per vectorised call while generating


class KstoreBios(tfds.core.GeneratorBasedBuilder):
  """bioS bios and QA pairs of one World (population, groups, tokenizer, QA split)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "bios, qa_train, qa_test as token ids, loss masks and text.",
                   "1.1.0": "data.groups: every group's bios, a `group` field."}

  # tfds 4.9.10 infers `code_path` through the `importlib_resources` backport, which it only
  # requires on Python < 3.9, so download_and_prepare fails without it; this file is the
  # answer anyway.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> pathlib.Path:
    return pathlib.Path(__file__)

  def __init__(self, world, *, data_dir, **kwargs):
    self.world = world            # set before super().__init__, which calls _info()
    super().__init__(data_dir=data_dir, file_format="array_record", **kwargs)
    # tfds unpickles a builder (e.g. inside a data source sent to Grain worker processes)
    # by calling __init__(**_original_state): the world must be part of it.
    self._original_state = dict(self._original_state, world=world)

  def _info(self) -> tfds.core.DatasetInfo:
    w = self.world
    return tfds.core.DatasetInfo(
        builder=self,
        description=("bioS biographies and question-answer pairs (Physics of Language "
                     "Models 3.1), rendered by kstore_jax."),
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "loss": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "kind": tfds.features.Scalar(dtype=np.int8),
            "person": tfds.features.Scalar(dtype=np.int64),
            "group": tfds.features.ClassLabel(names=[g.name for g in w.groups]),
            "index": tfds.features.Scalar(dtype=np.int64),
            "text": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(world_metadata(w)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    w = self.world
    return {
        "bios": self._generate_bios(),
        "qa_train": self._generate_examples(w.qa(w.train_people), KIND_QA),
        "qa_test": self._generate_examples(w.qa(w.test_people), KIND_QA),
    }

  def _generate_bios(self):
    """Each group's bios, indexed one group after another."""
    offset = 0
    for g in self.world.groups:
      src = self.world.group_bios(g)
      yield from self._generate_examples(src, KIND_BIO, offset)
      offset += len(src)

  def _generate_examples(self, source, kind: int, offset: int = 0):
    w = self.world
    for start in range(0, len(source), _RENDER_BATCH):
      idx = np.arange(start, min(start + _RENDER_BATCH, len(source)))
      docs = source.docs(idx)
      people, _ = source.locate(idx)
      groups = w.group_of(people)
      token_lists = [docs.tokens[docs.offsets[j]:docs.offsets[j + 1]] for j in range(len(idx))]
      texts = [w.renderer.decode(t) for t in token_lists]
      for j, i in enumerate((idx + offset).tolist()):
        s = slice(docs.offsets[j], docs.offsets[j + 1])
        yield i, {
            "tokens": token_lists[j].astype(np.int32),
            "loss": docs.loss[s].astype(np.bool_),
            "kind": np.int8(kind),
            "person": np.int64(people[j]),
            "group": int(groups[j]),
            "index": np.int64(i),
            "text": texts[j],
        }


def world_metadata(world) -> dict:
  """What identifies a corpus: stored in metadata.json, checked when a corpus is reused."""
  r = world.renderer
  digest = hashlib.sha256()
  people = [getattr(world.pop, f.name) for f in dataclasses.fields(world.pop) if f.name != "seed"]
  for a in (r.piece_len, r.piece_tokens, *people, np.asarray(world.qa_train)):
    digest.update(np.ascontiguousarray(a).tobytes())
  return dict(
      seed=int(world.seed), n_people=len(world.pop), n_qa_train=int(np.sum(world.qa_train)),
      groups={g.name: dict(people=[g.start, g.stop], **dataclasses.asdict(g.aug))
              for g in world.groups},
      vocab_size=int(r.tokenizer.get_vocab_size()),
      fingerprint=digest.hexdigest()[:16])   # tokens of every piece, the people, the QA split


def build(world, data_dir) -> KstoreBios:
  """Materialise `world` under `data_dir` (reused if already there) and return the builder.

  Raises ValueError if `data_dir` already holds a corpus of a different world (population,
  groups and their augmentation, tokenizer or QA split).
  """
  builder = KstoreBios(world, data_dir=data_dir)
  stored = pathlib.Path(builder.data_dir) / "metadata.json"
  if stored.exists():
    have, want = json.loads(stored.read_text()), world_metadata(world)
    if have != want:
      diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
      raise ValueError(f"{builder.data_dir} holds a different corpus (stored vs wanted: "
                       f"{diff}); use another data_dir")
  builder.download_and_prepare(file_format="array_record")
  return builder


def data_source(builder: KstoreBios, split: str) -> sources.ItemSource:
  """Random-access Grain source over one split's records (dicts of NumPy arrays)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  return sources.ItemSource(builder.as_data_source(split=split))
