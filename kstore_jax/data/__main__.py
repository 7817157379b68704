"""Look at the data a config makes: rendered bios and QA pairs, or corpus statistics.

    python -m kstore_jax.data --config=configs/tiny.py                 # a few bios + QA
    python -m kstore_jax.data --config=configs/multi5_permute.py:tiny --show=5 --split=bios
    python -m kstore_jax.data --config=configs/base.py:small --stats  # JSON on the last line

`--show=N` prints the first N bios (all copies of person 0 first), with their token counts and
the value each attribute span points at, then the six QA pairs of the first person shown
(`--split=qa`: the QA pairs of the first N people). Token counts include the BOS/EOT tokens.
`--stats` prints one JSON object as the last line.
"""

import json

import numpy as np
from absl import flags

from kstore_jax import cli
from kstore_jax.data import pools as pools_lib
from kstore_jax.data import tokenizer as tokenizer_lib
from kstore_jax.data import world as world_lib
from kstore_jax.data.population import N_DAYS, N_YEARS
from kstore_jax.data.templates import ATTRIBUTES, load_templates

CONFIG = cli.config_flag()
SHOW = flags.DEFINE_integer("show", 3, "print this many rendered documents (0: none)",
                            lower_bound=0)
STATS = flags.DEFINE_bool("stats", False, "print corpus statistics as one JSON line (last)")
SPLIT = flags.DEFINE_enum("split", None, ["bios", "qa"],
                          "what --show prints: bios or QA pairs (default: both)")
SAMPLE = 20_000


def n_values(name: str) -> int:
  """Number of possible values (classes) of an attribute."""
  p = pools_lib.load_pools()
  return {"birth_date": N_YEARS * 12 * N_DAYS, "birth_city": len(p.birth_cities),
          "university": len(p.universities), "major": len(p.majors),
          "company": len(p.companies), "company_city": len(p.hq_cities)}[name]


def half(world, person: int) -> str:
  return "qa_train" if world.qa_train[person] else "qa_test"


def show_bios(world, n: int) -> None:
  bios = world.bios()
  idx = np.arange(min(n, len(bios)))
  docs, spans = bios.docs(idx), bios.spans(idx)
  people, copies = bios.locate(idx)
  r = world.renderer
  for i in range(len(idx)):
    tokens = docs.doc(i)["tokens"]
    p = int(people[i])
    print(f"--- bio {idx[i]}: person {p} ({world.pop.full_name(p)}, {half(world, p)}), "
          f"copy {copies[i]} of {bios.aug.copies}, {len(tokens)} tokens")
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


def stats(world, tok) -> dict:
  pop, rng = world.pop, np.random.default_rng(0)
  bios = world.bios()
  bio_idx = np.sort(rng.choice(len(bios), min(SAMPLE, len(bios)), replace=False))
  bio_len = bios.docs(bio_idx).lengths
  qa = world.qa(np.arange(len(pop)))
  qa_len = qa.docs(np.sort(rng.choice(len(qa), min(SAMPLE, len(qa)), replace=False))).lengths
  counts = {a: np.bincount(pop.attribute(a), minlength=n_values(a)) for a in ATTRIBUTES}
  names = np.stack([pop.first, pop.middle, pop.last], 1)
  return {
      "people": len(pop), "bios": len(bios), "copies_per_person": bios.aug.copies,
      "templates_per_attribute": {a: len(t) for a, t in load_templates().items()},
      "bio_tokens_mean": round(float(bio_len.mean()), 2), "bio_tokens_min": int(bio_len.min()),
      "bio_tokens_max": int(bio_len.max()), "bio_tokens_sample": len(bio_idx),
      "qa_tokens_mean": round(float(qa_len.mean()), 2),
      "value_counts_min_max": {a: [int(c.min()), int(c.max())] for a, c in counts.items()},
      "value_classes": {a: len(c) for a, c in counts.items()},
      "unique_names": len(np.unique(names, axis=0)),
      "vocab_size": tok.get_vocab_size(),
      "qa_train_people": int(world.qa_train.sum()), "qa_test_people": int((~world.qa_train).sum()),
  }


def main(argv):
  if len(argv) > 1:
    raise cli.ConfigError(f"unexpected arguments {argv[1:]}")
  cfg = cli.validated_config(CONFIG.value)
  with cli.config_errors():
    tok = tokenizer_lib.get_tokenizer(cfg.data)
    world = world_lib.build_world(cfg, tok)
  show = SHOW.value if (SHOW.present or not STATS.value) else 0
  if show and SPLIT.value != "qa":
    show_bios(world, show)
  if show and SPLIT.value != "bios":
    first = world.bios().locate([0])[0]
    show_qa(world, np.arange(min(show, len(world.pop))) if SPLIT.value == "qa" else first)
  if STATS.value:
    print(json.dumps(stats(world, tok)))


if __name__ == "__main__":
  cli.run(main, "kstore_jax.data")
