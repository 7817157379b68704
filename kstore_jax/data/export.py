"""A world's bios as bio records (data/records.py), written as JSON lines or a tfds dataset.

    python -m kstore_jax.data --config=configs/tiny.py --export=DIR [--format=tfds|jsonl]

DIR receives the records (`bios.jsonl`, or the tfds dataset `kstore_bios/2.0.0/`) and the
world's `tokenizer.json`. Every group's bios, group after group, each person's copies in order;
a record's text is the bio as the model reads it (the decoded tokens between the EOTs, less
the leading space the importer puts back) and its spans are the values' exact character spans.
Importing it (`data.source`, with `data.tokenizer_path=DIR/tokenizer.json`) gives the same
people, bios, QA and batches as the generator (tests/test_tfds.py).
"""

import os
import shutil

import numpy as np

from kstore_jax.data import records
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.errors import ConfigError

FORMATS = ("tfds", "jsonl")
JSONL = "bios.jsonl"
TOKENIZER = "tokenizer.json"
_BATCH = 4096


def bio_record(world, person: int, copy: int, group: str, tokens, spans_A2) -> dict:
  """The record of one bio: its person's facts, text and character spans (from the token
  spans [6, 2] in doc coordinates)."""
  decode = world.renderer.decode
  body = tokens[1:-1]
  text = decode(body)
  lead = 1 if text.startswith(" ") else 0     # the importer puts the leading space back
  spans = {}
  for a, (s, e) in zip(ATTRIBUTES, np.asarray(spans_A2) - 1):
    before, value = len(decode(body[:s])), decode(body[s:e])
    start = before + len(value) - len(value.lstrip())
    spans[a] = [start - lead, before + len(value) - lead]
  return {"person": int(person), "copy": int(copy), "name": world.pop.full_name(person),
          "group": group, **world.pop.values(person), "text": text[lead:], "spans": spans}


def bio_records(world):
  """Every bio of the world as a record, group after group, person-major."""
  for g in world.groups:
    src = world.group_bios(g)
    for start in range(0, len(src), _BATCH):
      idx = np.arange(start, min(start + _BATCH, len(src)))
      docs, spans = src.docs(idx), src.spans(idx)
      people, copies = src.locate(idx)
      for j in range(len(idx)):
        yield bio_record(world, people[j], copies[j], g.name, docs.doc(j)["tokens"], spans[j])


def export(world, out_dir: str, fmt: str) -> str:
  """Write the world's bio records and tokenizer into out_dir (ConfigError if it holds an
  export already); the `data.source` that imports them. An OSError while writing leaves
  nothing of this export: out_dir where this call made it, else the files it wrote there."""
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r} must be one of {'|'.join(FORMATS)}")
  from kstore_jax.data import tfds_bios
  parts = [os.path.join(out_dir, p) for p in (JSONL, tfds_bios.NAME, TOKENIZER)]
  taken = [os.path.basename(p) for p in parts if os.path.exists(p)]
  if taken:
    raise ConfigError(f"--export={out_dir}: holds an export already ({', '.join(taken)}); "
                      "use a new directory")
  made = not os.path.exists(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  try:
    if fmt == "jsonl":
      path = os.path.join(out_dir, JSONL)
      records.write_jsonl(bio_records(world), path)
    else:
      path = out_dir
      tfds_bios.write(lambda: bio_records(world), out_dir)
    world.renderer.tokenizer.save(os.path.join(out_dir, TOKENIZER))
  except OSError:   # a full disk, a directory made read-only meanwhile: none of it is left
    for p in [out_dir] if made else parts:
      if os.path.isdir(p):
        shutil.rmtree(p, ignore_errors=True)
      elif os.path.exists(p):
        os.remove(p)
    raise
  return f"{fmt}:{path}"
