"""Look at the data a config makes: rendered bios and QA pairs, or corpus statistics.

    python -m kstore_jax.data --config=configs/tiny.py                 # a few bios + QA
    python -m kstore_jax.data --config=configs/multi5_permute.py:tiny --show=5 --split=bios
    python -m kstore_jax.data --config=configs/base.py:small --stats  # JSON on the last line
    python -m kstore_jax.data --config=configs/tiny.py --export=DIR [--format=jsonl]

`--show=N` prints, for each group of people (data.groups; one group `all` without), its first N
bios (all copies of its first person first), with their token counts and the value each
attribute span points at, then the six QA pairs of its first person (`--split=qa`: the QA pairs
of its first N people). Token counts include the BOS/EOT tokens.
`--stats` prints one JSON object as the last line; `groups` holds per-group counts (people,
bios, QA split, pretraining document weight, share of the stream's bio positions); the QA split
counts `qa_train_people`, `qa_valid_people` (data.qa_valid_fraction) and `qa_test_people`.
`--export=DIR` writes the world's bios as bio records (data/export.py: `--format=tfds`, the
default, or `jsonl`) with its tokenizer, and prints the `data.source` that imports them; a DIR
this process cannot make or write in is one line before the world is built.
"""

import json
import os

import numpy as np
from absl import flags

from kstore_jax import rundir
from kstore_jax.data import export as export_lib
from kstore_jax.data import tokenizer as tokenizer_lib
from kstore_jax.data import world as world_lib
from kstore_jax.data.templates import ATTRIBUTES, load_templates
from kstore_jax.tools import cli

CONFIG = cli.config_flag()
SHOW = flags.DEFINE_integer("show", 3, "print this many rendered documents (0: none)",
                            lower_bound=0)
STATS = flags.DEFINE_bool("stats", False, "print corpus statistics as one JSON line (last)")
SPLIT = flags.DEFINE_enum("split", None, ["bios", "qa"],
                          "what --show prints: bios or QA pairs (default: both)")
EXPORT = flags.DEFINE_string("export", None, "write the world's bios as bio records (and its "
                             "tokenizer.json) into this new directory")
FORMAT = flags.DEFINE_enum("format", "tfds", list(export_lib.FORMATS),
                           "--export: a tfds dataset (array_record) or JSON lines")
SAMPLE = 20_000


def half(world, person: int) -> str:
  """The person's side of the QA split, as results.json names it (a valid person, held back
  from training by data.qa_valid_fraction, is no test person)."""
  return ("qa_train" if world.qa_train[person] else "qa_valid" if world.qa_valid[person]
          else "qa_test")


def show_bios(world, group, n: int) -> None:
  bios = world.group_bios(group)
  idx = np.arange(min(n, len(bios)))
  docs, spans = bios.docs(idx), bios.spans(idx)
  people, copies = bios.locate(idx)
  r = world.renderer
  for i in range(len(idx)):
    tokens = docs.doc(i)["tokens"]
    p = int(people[i])
    print(f"--- bio {idx[i]} of group {group.name}: person {p} ({world.pop.full_name(p)}, "
          f"{half(world, p)}), copy {copies[i]} of {group.aug.copies}, {len(tokens)} tokens")
    print(r.decode(tokens))
    print("    spans: " + "; ".join(f"{a}={r.decode(tokens[s:e]).strip()!r}"
                                    for a, (s, e) in zip(ATTRIBUTES, spans[i])))


def show_qa(world, people) -> None:
  qa = world.qa(np.asarray(people))
  docs = qa.docs(np.arange(len(qa)))
  for i in range(len(qa)):
    p, a = (int(x[0]) for x in qa.locate([i]))
    if i % len(ATTRIBUTES) == 0:
      print(f"--- QA of person {p} ({world.pop.full_name(p)}): {half(world, p)} half")
    tokens = docs.doc(i)["tokens"]
    print(f"[{ATTRIBUTES[a]}, {len(tokens)} tokens] " + world.renderer.decode(tokens))


def show(world, n: int, split: str | None) -> None:
  """Per group: its first n bios, then the QA of its first person (split 'qa': of its first
  n people)."""
  for g in world.groups:
    if split != "qa":
      show_bios(world, g, n)
    if split != "bios":
      show_qa(world, g.people[:n if split == "qa" else 1])


def sample_lengths(src, rng) -> np.ndarray:
  """Token counts of a sample of src's documents (at most SAMPLE)."""
  return src.docs(np.sort(rng.choice(len(src), min(SAMPLE, len(src)), replace=False))).lengths


def length_stats(prefix: str, lens: np.ndarray, weights=None) -> dict:
  """Mean (weighted: each sampled document stands for `weights` documents), min, max, sample
  size of token counts."""
  return {f"{prefix}_mean": round(float(np.average(lens, weights=weights)), 2),
          f"{prefix}_min": int(lens.min()), f"{prefix}_max": int(lens.max()),
          f"{prefix}_sample": len(lens)}


def group_stats(world, srcs, weights, bio_lens) -> dict:
  """Per group (its bio source, document weight and sampled bio token counts): people, bios,
  QA split, the weight and its share of the stream's bio positions (weight x mean positions per
  bio, normalised), bio token counts."""
  stream = np.array([w * total / len(s) for s, w, (total, _, _) in
                     zip(srcs, weights, world.bio_positions)])
  return {g.name: {"people": g.stop - g.start, "bios": len(s), "copies_per_person": g.aug.copies,
                   "qa_train_people": int(world.qa_train[g.start:g.stop].sum()),
                   "qa_valid_people": int(world.qa_valid[g.start:g.stop].sum()),
                   "doc_weight": round(w, 4), "tokens_share": round(float(share), 4),
                   **length_stats("bio_tokens", lens)}
          for g, s, w, share, lens in zip(world.groups, srcs, weights, stream / stream.sum(),
                                          bio_lens)}


def stats(world, tok) -> dict:
  pop, rng = world.pop, np.random.default_rng(0)
  bios, weights = world.bio_mixture()
  bio_lens = [sample_lengths(s, rng) for s in bios]
  stands_for = np.concatenate([np.full(len(l), len(s) / len(l)) for s, l in zip(bios, bio_lens)])
  qa_len = sample_lengths(world.qa(np.arange(len(pop))), rng)
  n_values = pop.value_counts()
  counts = {a: np.bincount(pop.attribute(a), minlength=n_values[a]) for a in ATTRIBUTES}
  return {
      "people": len(pop), "bios": sum(len(s) for s in bios),
      "templates_per_attribute": {a: len(t) for a, t in load_templates().items()},
      **length_stats("bio_tokens", np.concatenate(bio_lens), stands_for),
      "qa_tokens_mean": round(float(qa_len.mean()), 2),
      "value_counts_min_max": {a: [int(c.min()), int(c.max())] for a, c in counts.items()},
      "value_classes": {a: len(c) for a, c in counts.items()},
      "unique_names": len({pop.full_name(i) for i in range(len(pop))}),
      "vocab_size": tok.get_vocab_size(),
      "qa_train_people": len(world.train_people), "qa_valid_people": len(world.valid_people),
      "qa_test_people": len(world.test_people),
      "groups": group_stats(world, bios, weights, bio_lens),
  }


def check_export() -> None:
  """--export and --format before the world is built: an empty --export (it printed bios
  instead), --format without --export (ignored), a directory that cannot be made or written
  (the nearest existing one above it no directory, or not writable by this process) are one
  line naming the flag."""
  if FORMAT.present and EXPORT.value is None:
    raise cli.ConfigError(f"--format={FORMAT.value} goes with --export=DIR (it would be ignored)")
  if EXPORT.value is None:
    return
  if not EXPORT.value:
    raise cli.ConfigError("--export: empty; expected a directory to write the bio records into")
  rundir.check_writable(EXPORT.value, "--export")


def export(world, out_dir: str, fmt: str) -> str:
  """export_lib.export (which leaves nothing of a failed export); an OSError all the same (a
  full disk, a directory made read-only meanwhile) is one line naming --export."""
  try:
    return export_lib.export(world, out_dir, fmt)
  except OSError as e:
    raise cli.ConfigError(f"--export={out_dir}: {e.strerror or type(e).__name__} "
                          f"({e.filename or out_dir})") from None


def main(argv):
  if len(argv) > 1:
    raise cli.ConfigError(f"unexpected arguments {argv[1:]}")
  cfg = cli.validated_config(CONFIG.value)
  check_export()
  with cli.config_errors():
    tok = tokenizer_lib.of_config(cfg)
    world = world_lib.build_world(cfg, tok)
  n = SHOW.value if (SHOW.present or not (STATS.value or EXPORT.value)) else 0
  if n:
    show(world, n, SPLIT.value)
  if STATS.value:
    print(json.dumps(stats(world, tok)))
  if EXPORT.value:
    spec = export(world, EXPORT.value, FORMAT.value)
    print(f"exported the bios of {len(world.pop)} people: data.source={spec!r} "
          f"(data.tokenizer_path={EXPORT.value}/{export_lib.TOKENIZER} for the same tokens)")


def run() -> None:
  """`python -m kstore_jax.data` (the shim kstore_jax/data/__main__.py calls this)."""
  cli.run(main, "kstore_jax.data")
