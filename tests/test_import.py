"""Bring your own biographies (data.source = jsonl:FILE): locating values, one-line errors for
bad records, and the README's worked example end to end (bios in new wordings, any order)."""

import json
import random

import numpy as np
import pytest
from runs import micro_stage_args, run_main

from configs import base
from kstore_jax import configlib
from kstore_jax.data import imported, population, probing, records, tokenizer
from kstore_jax.data import world as world_lib
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.errors import ConfigError

# -- locating values -----------------------------------------------------------------------
VALUES = ("May 3, 1950", "Paris", "Art Institute", "Art", "Acme", "Paris")


def test_locate_exact_then_case_insensitive_whole_words():
  text = ("Art Lee (born May 3, 1950 in Paris) studied ART at the Art Institute, then worked "
          "for Acme in paris.")
  spans = records.locate(text, "Art Lee", VALUES, {})
  got = [text[s:e] for s, e in spans]
  # "Art" is neither the name's "Art" nor inside "Art Institute": the case-insensitive "ART";
  # the two Paris values take the two occurrences (exact first)
  assert got == ["May 3, 1950", "Paris", "Art Institute", "ART", "Acme", "paris"]
  assert spans[1, 0] < spans[5, 0]
  first_paris = text.index("Paris")
  given = records.locate(text, "Art Lee", VALUES,
                         {"company_city": (first_paris, first_paris + 5)})
  assert [text[s:e] for s, e in given] == ["May 3, 1950", "paris", "Art Institute", "ART",
                                           "Acme", "Paris"]
  # whole words only: not the "Art" of "Arthur" or "Artistic"
  text2 = "Arthur (May 3, 1950, Paris) studied Artistic stuff and Art at the Art Institute."
  spans2 = records.locate(text2, "Arthur", (*VALUES[:4], "stuff", "Artistic"), {})
  assert spans2[3].tolist() == [text2.index(" Art ") + 1, text2.index(" Art ") + 4]
  with pytest.raises(ValueError, match=r"text: the company value 'Acme Corp' is not in the bio"):
    records.locate(text, "Art Lee", (*VALUES[:4], "Acme Corp", "Paris"), {})
  with pytest.raises(ValueError, match=r"spans.major: text\[0:3\] is 'Art', not the major"):
    records.locate(text, "Art Lee", (*VALUES[:3], "Music", *VALUES[4:]), {"major": (0, 3)})


def test_segments_keep_each_value_with_its_space():
  text = "Ann was born on May 3, 1950 in Paris. She studied Art at MIT, then worked for Acme in Paris."
  spans = records.locate(text, "Ann", ("May 3, 1950", "Paris", "MIT", "Art", "Acme", "Paris"), {})
  segs, at = imported.segments(text, spans)
  assert segs == [" Ann was born on", " May 3, 1950", " in", " Paris", ". She studied", " Art",
                  " at", " MIT", ", then worked for", " Acme", " in", " Paris", "."]
  assert at == [1, 3, 7, 5, 9, 11]


def test_birth_month():
  assert [imported.birth_month(d) for d in ("May 3, 1950", "3 sept. 1950", "1950-12-01")] == \
         [4, 8, 11]
  with pytest.raises(ValueError, match="names no month"):
    imported.birth_month("3/5/1950")


# -- one-line errors ----------------------------------------------------------------------
def person_records(n=2, copies=1):
  pop = population.make_population(0, n)
  out = []
  for p in range(n):
    v = pop.values(p)
    for c in range(copies):
      text = (f"{pop.full_name(p)} was born on {v['birth_date']} in {v['birth_city']}. "
              f"Alumnus of {v['university']} ({v['major']}), employed by {v['company']} in "
              f"{v['company_city']}.")
      out.append({"person": p, "name": pop.full_name(p), **v, "text": text, "copy": c})
  return out


def write(path, recs, raw=None):
  lines = [json.dumps(r) for r in recs] if raw is None else raw
  path.write_text("".join(l + "\n" for l in lines))
  return f"jsonl:{path}"


def bad(tmp_path, change):
  recs = person_records(3)
  change(recs)
  return write(tmp_path / "bad.jsonl", recs)


@pytest.mark.parametrize("change, match", [
    (lambda r: r[1].update(text=r[1]["text"].replace(r[1]["major"], "Dance")),
     r"line 2: text: the major value '.*' is not in the bio"),
    (lambda r: r[0].update(hometown="Paris"), r"line 1: hometown: unknown field"),
    (lambda r: r[2].pop("company"), r"line 3: company: missing"),
    (lambda r: r[1].update(name=r[0]["name"]),
     r"line 2: name: '.*' is also the name of person 0 \(.* line 1\); names must be unique"),
    (lambda r: r.append({**r[0], "copy": 1, "major": "Dance"}),
     r"line 4: major: 'Dance' for person 0, but '.*' in .* line 1"),
    (lambda r: r.append(dict(r[0])), r"line 4: copy: person 0 has copy 0 twice"),
    (lambda r: r.append({**r[0], "copy": 2}), r"line 1: copy: person 0 has 2 bios but no copy 1"),
    (lambda r: r.append({**r[0], "copy": 1}),
     r"group 'all': person 1 has 1 bios, person 0 has 2"),
    (lambda r: r[0].update(spans={"major": [0, 3]}), r"line 1: spans.major: text\[0:3\] is"),
    (lambda r: r[0].update(spans={"major": [5, 900]}), r"line 1: spans.major: \[5, 900\] is not"),
    (lambda r: r[1].update(person=-1), r"line 2: person: -1 is not an integer >= 0"),
])
def test_bad_records_fail_in_one_line_naming_file_line_and_field(tmp_path, change, match):
  spec = bad(tmp_path, change)
  with pytest.raises(ConfigError, match=match) as e:
    records.read_source(spec)
  assert str(tmp_path / "bad.jsonl") in str(e.value) and "\n" not in str(e.value)


def test_malformed_truncated_and_empty_files(tmp_path):
  lines = [json.dumps(r) for r in person_records(3)]
  path = tmp_path / "x.jsonl"
  write(path, None, [lines[0], "{not json", lines[2]])
  with pytest.raises(ConfigError, match=rf"{path} line 2: not a JSON object: "):
    records.read_source(f"jsonl:{path}")
  path.write_text("\n".join(lines)[:-40])                 # cut inside the last line
  with pytest.raises(ConfigError, match=rf"{path} line 3: not a JSON object \(truncated"):
    records.read_source(f"jsonl:{path}")
  write(path, None, ["[1, 2]"])
  with pytest.raises(ConfigError, match=rf"{path} line 1: expected a JSON object, got list"):
    records.read_source(f"jsonl:{path}")
  path.write_text("\n\n")
  with pytest.raises(ConfigError, match=rf"{path}: no bio records \(empty dataset\)"):
    records.read_source(f"jsonl:{path}")


def test_data_source_key_is_validated(tmp_path):
  c = base.get_config("tiny")
  for value, match in (("csv:x", "must be 'generated', 'tfds:DIR' or 'jsonl:FILE'"),
                       (f"jsonl:{tmp_path}/none.jsonl", "no such file")):
    c.data.source = value
    with pytest.raises(ConfigError, match=match):
      configlib.validate(c, 1, platform="cpu")


def test_main_refuses_a_bad_file_before_writing_anything(tmp_path, jax_cache):
  spec = bad(tmp_path, lambda r: r[0].update(hometown="Paris"))
  wd = tmp_path / "run"
  r = run_main(["--config=configs/tiny.py", f"--workdir={wd}", f"--config.data.source={spec}"],
               jax_cache, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].endswith("line 1: hometown: unknown field; expected "
                                                    + ", ".join(records.FIELDS))
  assert not wd.exists()


# -- the worked example: 200 people, bios in new wordings, trained from jsonl: ----------------
# Hand-written sentence templates standing in for an LLM's rewriting: other words than the
# generator's, the subject by name or pronoun, some values lower-cased.
TEMPLATES = {
    "birth_date": ("{s} celebrates a birthday every year, having been born {v}.",
                   "The records list {v} as the day {s} was born."),
    "birth_city": ("{s} spent a happy childhood in {v}.", "Home for {s} was always {v}."),
    "university": ("Later, {s} enrolled at {v}.", "{s} holds a degree from {v}."),
    "major": ("The subject {s} loved most was {lv}.", "{s} chose to specialise in {v}."),
    "company": ("These days {s} earns a living at {v}.", "{s} joined the staff of {v}."),
    "company_city": ("The office where {s} works is in {v}.", "Each morning {s} commutes to {v}."),
}
N_WORKED = 200


def rewritten_bio(rng, name, values, pronoun):
  """Six sentences in a random order, each from a random template; the first names the
  person, the rest mostly use the pronoun."""
  out = []
  for k, a in enumerate(rng.sample(ATTRIBUTES, len(ATTRIBUTES))):
    s = name if k == 0 or rng.random() < 0.2 else pronoun
    t = rng.choice(TEMPLATES[a])
    sentence = t.format(s=s, v=values[a], lv=values[a].lower())
    out.append(sentence[0].upper() + sentence[1:])
  return " ".join(out)


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
  """200 people of the generator, two rewritten bios each, as JSON lines without spans."""
  path = tmp_path_factory.mktemp("byob") / "bios.jsonl"
  pop = population.make_population(7, N_WORKED)
  rng = random.Random(0)
  recs = [{"person": p, "name": pop.full_name(p), **pop.values(p),
           "text": rewritten_bio(rng, pop.full_name(p), pop.values(p), ("He", "She")[pop.gender[p]])}
          for p in range(N_WORKED) for _ in range(2)]
  records.write_jsonl(recs, str(path))
  return f"jsonl:{path}", pop, recs


def worked_config(spec):
  c = base.get_config("tiny")
  c.data.update(source=spec, vocab_size=1024)
  return c


def test_worked_example_world(worked):
  spec, pop, recs = worked
  cfg = worked_config(spec)
  w = world_lib.build_world(cfg, tokenizer.get_tokenizer(cfg.data))
  assert len(w.pop) == N_WORKED and w.aug.copies == 2 and w.max_doc_positions() < 128
  assert w.train_people.size == N_WORKED // 2
  for p in (0, 57, 199):
    assert w.pop.full_name(p) == pop.full_name(p) and w.pop.values(p) == pop.values(p)
  # each value's token span decodes to the value as the bio wrote it; the P-probe positions
  # are the tokens before the values in reading order
  people = np.arange(0, N_WORKED, 9)
  docs, spans = w.bio_docs(people, np.ones_like(people))
  (tokens, _), probe_at, labels = probing.pprobe_examples(w, people, np.ones_like(people))
  for i, p in enumerate(people):
    text, values = recs[2 * p + 1]["text"].lower(), pop.values(p)
    for k, a in enumerate(ATTRIBUTES):
      s, e = spans[i, k]
      assert w.renderer.decode(tokens[i, s:e]).strip().lower() == values[a].lower()
    reading = sorted(ATTRIBUTES, key=lambda a: text.index(values[a].lower()))
    assert [spans[i, ATTRIBUTES.index(a), 0] - 1 for a in reading] == probe_at[i].tolist()
  assert labels[:, 0].tolist() == [int(pop.birth_month[p]) for p in people]
  # QA answers are the canonical values
  qa = w.qa(people[:3])
  for j in range(len(qa)):
    p, a = (int(x[0]) for x in qa.locate([j]))
    assert w.renderer.decode(qa.docs([j]).tokens).endswith(
        f" {pop.values(p)[ATTRIBUTES[a]]}<|endoftext|>")


def test_worked_example_trains_and_evaluates_end_to_end(worked, tmp_path, jax_cache):
  spec, _, _ = worked
  wd = tmp_path / "run"
  args = ["--config=configs/base.py:tiny", f"--workdir={wd}", f"--config.data.source={spec}",
          "--config.data.vocab_size=1024", "--config.stages=pretrain,finetune,eval,pprobe",
          *micro_stage_args(8, 10, pretrain=4, finetune=2, pprobe=2)]
  r = run_main(args, jax_cache, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  for key in ("qa_test", "qa_train", "bio_recall"):
    assert set(res[key]) == {*ATTRIBUTES, "mean"} and res[key + "_ci"]["mean"]["n"] == 6 * 100
  assert np.asarray(res["pprobe"]).shape == (6, 6)
  assert res["pprobe_ci"][0][0]["n"] == N_WORKED // 2
  assert (wd / "tokenizer.json").exists()
