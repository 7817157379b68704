"""Bio records (data/records.py) as a tensorflow-datasets dataset in array_record files.

    DIR/kstore_bios/2.0.0/kstore_bios-bios.array_record-00000-of-00001 ...

One split, `bios`: a record per bio with the fields of data/records.py (`spans` as an int64
[6, 2] array in ATTRIBUTES order, -1 where a span is not given). `write(records, DIR)` builds
it (`python -m kstore_jax.data --export=DIR --format=tfds`); `read(DIR)` checks and indexes it
as a records.Corpus whose texts are read back by record index (`data.source=tfds:DIR`); an
older version's dataset (1.x: token ids) is refused in one line asking for a re-export, a
damaged one (a record that does not read back) in one line naming the record and field.
TensorFlow is not needed (nor imported) to write or read it.
"""

import glob
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from kstore_jax.data import records
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.errors import ConfigError

NAME, SPLIT = "kstore_bios", "bios"
_TEXT = ("name", "group", *ATTRIBUTES, "text")
_BATCH = 1024       # records read per call


class KstoreBios(tfds.core.GeneratorBasedBuilder):
  """Bios with their people's facts and value spans (Physics of Language Models 3.1 records)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "bios, qa_train, qa_test as token ids, loss masks and text.",
                   "1.1.0": "data.groups: every group's bios, a `group` field.",
                   "2.0.0": "text records (data/records.py): people's facts, text, spans."}

  # tfds 4.9.10 infers `code_path` through the `importlib_resources` backport, which it only
  # requires on Python < 3.9, so download_and_prepare fails without it; this file is the
  # answer anyway.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> pathlib.Path:
    return pathlib.Path(__file__)

  def __init__(self, records_fn=None, *, data_dir, **kwargs):
    self.records_fn = records_fn    # () -> iterable of record dicts; set before _info() runs
    super().__init__(data_dir=data_dir, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = {k: tfds.features.Text() for k in _TEXT}
    return tfds.core.DatasetInfo(
        builder=self,
        description="Biographies with their people's facts and the character span of each "
                    "value (kstore_jax/data/records.py).",
        features=tfds.features.FeaturesDict({
            "person": tfds.features.Scalar(dtype=np.int64),
            "copy": tfds.features.Scalar(dtype=np.int64),
            "spans": tfds.features.Tensor(shape=(len(ATTRIBUTES), 2), dtype=np.int64),
            **text}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    for i, rec in enumerate(self.records_fn()):
      spans = np.full((len(ATTRIBUTES), 2), -1, np.int64)
      for a, se in rec.get("spans", {}).items():
        spans[ATTRIBUTES.index(a)] = se
      yield i, {"person": rec["person"], "copy": rec["copy"], "spans": spans,
                **{k: rec.get(k, records.DEFAULT_GROUP) for k in _TEXT}}


def write(records_fn, data_dir) -> str:
  """Build the dataset of records_fn()'s records under data_dir; its version directory."""
  builder = KstoreBios(records_fn, data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  return builder.data_dir


def version_dir(data_dir: str) -> str:
  """The one DIR/kstore_bios/<version> directory under data_dir (ConfigError if none)."""
  found = sorted(glob.glob(os.path.join(data_dir, NAME, "*", "dataset_info.json")))
  if len(found) != 1:
    raise ConfigError(f"data.source: {data_dir!r} holds {len(found)} {NAME} datasets "
                      f"({NAME}/<version>/dataset_info.json), expected one")
  return os.path.dirname(found[0])


def as_record(example) -> dict:
  """A tfds example -> the record dict of data/records.py. ValueError('<field>: ...') for a
  field that did not read back: an array_record file cut short gives examples whose every
  field is None, bytes that are not UTF-8 are no record's text either."""
  for k in ("person", "copy", "spans", *_TEXT):
    if example[k] is None:
      raise ValueError(f"{k}: unreadable (damaged file?)")
  rec = {}
  for k in _TEXT:
    try:
      rec[k] = example[k].decode()
    except UnicodeDecodeError as e:
      raise ValueError(f"{k}: not UTF-8 text ({e.reason} at byte {e.start}; damaged "
                       "file?)") from None
  spans = {a: [int(s), int(e)] for a, (s, e) in zip(ATTRIBUTES, np.asarray(example["spans"]))
           if s >= 0}
  return {"person": int(example["person"]), "copy": int(example["copy"]), **rec,
          **({"spans": spans} if spans else {})}


class TfdsReader:
  """Random access to the records' texts by record index."""

  def __init__(self, path: str):
    self.path = path
    self._builder = self._source = None

  @property
  def builder(self):
    if self._builder is None:
      self._builder = tfds.builder_from_directory(self.path)
    return self._builder

  @property
  def source(self):
    if self._source is None:
      self._source = self.builder.as_data_source(split=SPLIT)
    return self._source

  def texts(self, refs) -> list[str]:
    return [ex["text"].decode() for ex in self.source.__getitems__([int(r) for r in refs])]


def check_format(path: str, info) -> None:
  """ConfigError unless the dataset at `path` (a version directory, `info` its builder's info)
  has this version's split and features: an older export (1.x: token ids, no facts) cannot be
  read, only re-exported."""
  missing = [k for k in ("person", "copy", "spans", *_TEXT) if k not in info.features]
  if SPLIT not in info.splits:
    missing.append(f"split {SPLIT!r}")
  if missing:
    raise ConfigError(
        f"data.source: {path} is a {NAME} {info.version} dataset, not {NAME} "
        f"{KstoreBios.VERSION} text records (missing: {', '.join(missing)}): re-export the "
        "world with this version (python -m kstore_jax.data --config=... --export=DIR "
        "--format=tfds)")


def read(data_dir: str) -> records.Corpus:
  """Check and index the dataset under data_dir (records named by their index; one that does
  not read back, `as_record`, is a ConfigError naming it)."""
  path = version_dir(data_dir)
  reader = TfdsReader(path)
  check_format(path, reader.builder.info)
  index = records.RecordIndex(lambda i: f"{path} record {i}")
  source = reader.source
  for start in range(0, len(source), _BATCH):
    batch = list(range(start, min(start + _BATCH, len(source))))
    for i, example in zip(batch, source.__getitems__(batch)):
      try:
        rec = as_record(example)
      except ValueError as e:
        raise ConfigError(f"{index.where(i)}: {e}") from None
      index.add(i, i, rec)
  return index.corpus(path, reader)
