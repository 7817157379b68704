"""Bring your own biographies (data.source = jsonl:FILE): locating values, one-line errors for
bad records, and the README's worked example end to end (bios in new wordings, any order)."""

import json
import random

import numpy as np
import pytest
import tokenizers
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
  assert [records.birth_month(d) for d in ("May 3, 1950", "3 sept. 1950", "1950-12-01")] == \
         [4, 8, 11]
  with pytest.raises(ValueError, match="names no month"):
    records.birth_month("3/5/1950")


def test_given_spans_may_not_overlap_each_other_or_the_name():
  text = "Art Lee was born on May 3, 1950 in Paris. Art Lee studied Art at the Art Institute."
  values = ("May 3, 1950", "Paris", "Art Institute", "Art", "Acme", "Paris")
  paris = (text.index("Paris"), text.index("Paris") + 5)
  with pytest.raises(ValueError, match=r"spans.company_city: \[35, 40\] overlaps spans.birth_city"):
    records.locate(text, "Art Lee", values, {"birth_city": paris, "company_city": paris})
  with pytest.raises(ValueError, match=r"spans.major: \[0, 3\] overlaps the name 'Art Lee' at"):
    records.locate(text, "Art Lee", values, {"major": (0, 3)})
  inst = text.index("Art Institute")
  with pytest.raises(ValueError, match=r"spans.major: .* overlaps spans.university"):
    records.locate(text, "Art Lee", values, {"university": (inst, inst + 13),
                                             "major": (inst, inst + 3)})


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


def no_month(recs):
  """The third person's birth date names no month (the probes predict it)."""
  r = recs[2]
  r.update(birth_date="3/5/1950", text=r["text"].replace(r["birth_date"], "3/5/1950"))


def hometown(recs):
  recs[0]["hometown"] = "Paris"


def one_city_given_twice(rec):
  """Born and working in one city, both spans given as its first mention (as str.find gives)."""
  city = rec["birth_city"]
  rec["text"] = rec["text"].rsplit(rec["company_city"], 1)[0] + city + "."
  at = rec["text"].index(city)
  rec.update(company_city=city, spans={"birth_city": [at, at + len(city)],
                                       "company_city": [at, at + len(city)]})


@pytest.mark.parametrize("change, match", [
    (lambda r: r[1].update(text=r[1]["text"].replace(r[1]["major"], "Dance")),
     r"line 2: text: the major value '.*' is not in the bio"),
    (hometown, r"line 1: hometown: unknown field"),
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
    (lambda r: r[1].update(person=2 ** 64), r"line 2: person: 18446744073709551616 is not an "
     r"integer >= 0 and < 2\*\*63"),
    (lambda r: r[2].update(copy=2 ** 63), r"line 3: copy: 9223372036854775808 is not"),
    (no_month, r"line 3: birth_date: '3/5/1950' names no month"),
    (lambda r: one_city_given_twice(r[1]), r"line 2: spans.company_city: \[\d+, \d+\] overlaps "
     r"spans.birth_city \[\d+, \d+\]"),
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


def test_people_with_other_bio_counts_need_data_groups(tmp_path):
  """Without data.groups everyone is one group: one bio count for all (the world would serve
  the first person's count of everyone's bios: bios dropped, or another person's)."""
  recs = [r for r in person_records(4, copies=3) if r["person"] >= 2 or r["copy"] == 0]
  for r in recs[2:]:
    r["group"] = "multi"
  corpus = records.read_source(write(tmp_path / "mixed.jsonl", recs))
  cfg = base.get_config("tiny")
  with pytest.raises(ConfigError, match=rf"^{tmp_path}/mixed.jsonl: person 2 has 3 bios, "
                                        r"person 0 has 1 \(without data.groups"):
    world_lib.imported_groups(corpus, imported.people_order(corpus, None), cfg.data)
  for r in recs[:2]:
    r["group"] = "single"
  corpus = records.read_source(write(tmp_path / "grouped.jsonl", recs))
  cfg.data.groups = {"single": base.group(0.5, 0.5, 0.5), "multi": base.group(0.5, 0.5, 0.5)}
  groups = world_lib.imported_groups(corpus, imported.people_order(corpus, ["multi", "single"]),
                                     cfg.data)
  assert [(g.name, g.start, g.stop, g.aug.copies) for g in groups] == \
         [("multi", 0, 2, 3), ("single", 2, 4, 1)]


def test_a_dataset_whose_qa_train_side_is_nobody_is_refused(tmp_path):
  """configlib.validate checks the QA split of the generated data.n_people; an imported world
  checks its own (one person: round(0.5) = 0 trained on) before anything trains."""
  cfg = base.get_config("tiny")
  cfg.data.update(source=write(tmp_path / "one.jsonl", person_records(1, copies=2)),
                  vocab_size=512)
  configlib.validate(cfg, 1, platform="cpu")
  with pytest.raises(ConfigError, match=r"one.jsonl: data.qa_train_fraction=0.5 and "
                                        r"data.qa_valid_fraction=0 leave none of its 1 people"):
    world_lib.build_world(cfg, tokenizer.get_tokenizer(cfg.data))


def test_resuming_on_an_edited_data_source_is_refused(tmp_path):
  """The config names the file, not its contents: a rerun after the file changed would
  resume training on other bios. The workdir records the world's digest (world.json) and a
  rerun on other data stops in one line before writing anything; the same data resumes."""
  from kstore_jax import experiment
  recs = person_records(8, copies=2)
  cfg = base.get_config("tiny")
  cfg.data.update(source=write(tmp_path / "bios.jsonl", recs), vocab_size=512)
  wd = str(tmp_path / "run")
  exp, tok = experiment.open_experiment(cfg, wd, 1, "cpu")
  exp.start(tok)
  saved = (tmp_path / "run" / "world.json").read_text()
  experiment.open_experiment(cfg, wd, 1, "cpu")      # the same data: resumes
  recs[5]["text"] = recs[5]["text"].replace(" was born on ", " came into the world on ")
  write(tmp_path / "bios.jsonl", recs)
  with pytest.raises(ConfigError, match=rf"^--workdir={wd} holds a different experiment: its "
                                        r"data \(data.source='jsonl:.*bios.jsonl'\) has changed"):
    experiment.open_experiment(cfg, wd, 1, "cpu")
  assert (tmp_path / "run" / "world.json").read_text() == saved


def test_resuming_with_another_tokenizer_is_refused(tmp_path):
  """A generated world's digest holds no token ids: a data.tokenizer_path file replaced by one
  that gives two tokens each other's ids (same vocabulary size, same people) would resume
  training on other ids (an imported world's stored bios are in its digest). The workdir's
  tokenizer.json is compared with the tokenizer now."""
  from kstore_jax import experiment
  cfg = base.get_config("tiny")
  cfg.data.n_people = 100
  tok_path = tmp_path / "tok.json"
  tokenizer.of_config(cfg).save(str(tok_path))
  cfg.data.tokenizer_path = str(tok_path)
  wd = str(tmp_path / "run")
  exp, tok = experiment.open_experiment(cfg, wd, 1, "cpu")
  exp.start(tok)
  experiment.open_experiment(cfg, wd, 1, "cpu")      # the same tokenizer: resumes
  spec = json.loads(tok_path.read_text())
  vocab = spec["model"]["vocab"]
  vocab["Ġwas"], vocab["Ġborn"] = vocab["Ġborn"], vocab["Ġwas"]
  tok_path.write_text(json.dumps(spec))
  with pytest.raises(ConfigError, match=rf"^--workdir={wd} holds a different experiment: its "
                                        rf"tokenizer.json is not the tokenizer "
                                        rf"data.tokenizer_path='{tok_path}' gives$"):
    experiment.open_experiment(cfg, wd, 1, "cpu")


def test_a_file_that_is_no_tokenizer_is_one_line_naming_it(tmp_path):
  path = tmp_path / "tok.json"
  path.write_text("{}")
  with pytest.raises(ConfigError, match=rf"^{path}: not a tokenizer.json \(Model missing"):
    tokenizer.load_tokenizer(str(path))
  no_eot(path)
  with pytest.raises(ConfigError, match=rf"^{path}: the tokenizer has no <\|endoftext\|> token"):
    tokenizer.load_tokenizer(str(path))


def no_eot(path):
  """A tokenizer.json without the special tokens."""
  tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(path))
  return path


# the command line's bad input (tmp_path -> overrides) and the end of its one error line
BAD_FILES = {
    "unknown_field": (lambda d: [f"--config.data.source={bad(d, hometown)}"],
                      "line 1: hometown: unknown field; expected " + ", ".join(records.FIELDS)),
    "no_month": (lambda d: [f"--config.data.source={bad(d, no_month)}"],
                 "line 3: birth_date: '3/5/1950' names no month (January..December or "
                 "YYYY-MM-DD): the probes predict the birth month"),
    "tokenizer_without_eot": (
        lambda d: [f"--config.data.tokenizer_path={no_eot(d / 'tok.json')}"],
        "tok.json: the tokenizer has no <|endoftext|> token (the document separator)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_main_refuses_a_bad_file_before_writing_anything(tmp_path, jax_cache, case):
  overrides, ending = BAD_FILES[case]
  wd = tmp_path / "run"
  r = run_main(["--config=configs/tiny.py", f"--workdir={wd}", *overrides(tmp_path)],
               jax_cache, timeout=300)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].endswith(ending), r.stderr[-3000:]
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


def test_a_dataset_whose_qa_test_side_is_nobody_is_refused(tmp_path):
  """Three people at qa_train_fraction 0.9: round(2.7) = 3 trained on, nobody held out for
  the QA eval and the probes to score."""
  cfg = base.get_config("tiny")
  cfg.data.update(source=write(tmp_path / "three.jsonl", person_records(3, copies=2)),
                  vocab_size=512, qa_train_fraction=0.9)
  with pytest.raises(ConfigError, match=r"three.jsonl: the QA split holds none of its 3 people "
                                        r"out \(data.qa_train_fraction\)"):
    world_lib.build_world(cfg, tokenizer.get_tokenizer(cfg.data))


def test_probe_cohort_key_holds_the_heads_class_counts(tmp_path, monkeypatch):
  """Two imported datasets alike but for one attribute's number of values (one tokenizer for
  both, so the model and the Q-probe's input width agree): their probe heads differ in width,
  so a grid may not train them in one cohort (members start from the first one's init: the
  second's labels would run past its head). The keys were equal. A key needs no base params
  loaded (a grid keys every run before it trains any cohort)."""
  from kstore_jax import experiment
  recs = person_records(8)
  fewer = [dict(r) for r in recs]
  fewer[1]["major"] = fewer[0]["major"]      # one major fewer
  fewer[1]["text"] = recs[1]["text"].replace(recs[1]["major"], recs[0]["major"])
  keys, tok = [], None
  for name, data in (("a", recs), ("a_again", recs), ("fewer", fewer)):
    cfg = base.get_config("tiny,probe")
    cfg.data.update(source=write(tmp_path / f"{name}.jsonl", data), vocab_size=512)
    cfg.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64)
    tok = tok or tokenizer.get_tokenizer(cfg.data)
    exp = experiment.Experiment(cfg, tok, experiment.Workdir(str(tmp_path / name)))
    def no_load(stage):
      raise AssertionError("keyed on shapes, the base was loaded")

    monkeypatch.setattr(exp, "load_final", no_load)
    keys.append(exp.member("qprobe", name, abstract=True)[1])   # how a grid keys its runs
    monkeypatch.setattr(exp, "load_final", lambda stage, exp=exp: exp.random_params(0))
    assert exp.member("qprobe", name)[1] == keys[-1]             # the loaded member's key
  a, a_again, fewer_key = keys
  assert a == a_again
  assert a != fewer_key


# -- input the checks used to let through -------------------------------------------------
def test_a_damaged_tfds_dataset_is_one_line_naming_the_record(tmp_path):
  """An array_record file cut short reads back as examples whose every field is None: one line
  naming the dataset and the record, not an AttributeError from decoding None."""
  import glob
  from kstore_jax.data import tfds_bios
  recs = person_records(20)
  version = tfds_bios.write(lambda: recs, str(tmp_path))
  assert sorted(records.read_source(f"tfds:{tmp_path}").ids.tolist()) == list(range(20))
  [shard] = glob.glob(f"{version}/*.array_record-*")
  data = open(shard, "rb").read()
  open(shard, "wb").write(data[:len(data) // 2])
  with pytest.raises(ConfigError, match=rf"^{version} record 0: \w+: unreadable "
                                        r"\(damaged file\?\)$"):
    records.read_source(f"tfds:{tmp_path}")
  recs[1]["major"] = recs[1]["major"].encode() + b"\xff"    # bytes no text encodes to
  version = tfds_bios.write(lambda: recs, str(tmp_path / "bytes"))
  with pytest.raises(ConfigError, match=rf"^{version} record \d+: major: not UTF-8 text "
                                        r"\(invalid start byte at byte \d+; damaged file\?\)$"):
    records.read_source(f"tfds:{tmp_path / 'bytes'}")


@pytest.mark.parametrize("line, why", [
    ('{"person": ' + "9" * 5000 + "}", "digits"),          # past Python's int-parsing limit
    ("[" * 100_000 + "]" * 100_000, "recursion"),           # deeper than the parser recurses
])
def test_json_the_parser_gives_up_on_is_one_line_naming_the_line(tmp_path, line, why):
  path = tmp_path / "x.jsonl"
  write(path, None, [json.dumps(person_records(1)[0]), line])
  with pytest.raises(ConfigError, match=rf"^{path} line 2: not a JSON object: .*{why}") as e:
    records.read_source(f"jsonl:{path}")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("field", ["text", "name", "major", "group"])
def test_a_lone_surrogate_is_refused_naming_the_field(tmp_path, field):
  """JSON's \\ud800 escape decodes to a str that UTF-8 cannot encode: the tokenizer would fail
  on it later, naming no record."""
  recs = person_records(2)
  r = recs[1]
  old = r.get(field, "all")
  r[field] = old + " x\ud800"
  if field in ("name", "major"):
    r["text"] = r["text"].replace(old, r[field])
  path = tmp_path / "s.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in recs))    # ASCII: the \ud800 escape
  with pytest.raises(ConfigError, match=rf"^{path} line 2: {field}: character \d+ \('\\ud800'\) "
                                        r"cannot be encoded as UTF-8"):
    records.read_source(f"jsonl:{path}")


@pytest.mark.parametrize("special", tokenizer.SPECIAL_TOKENS)
@pytest.mark.parametrize("field", ["text", "name", "company"])
def test_a_special_token_in_a_record_is_refused_naming_the_field(tmp_path, special, field):
  """The tokenizer matches its special tokens anywhere in a text (add_special_tokens=False does
  not stop it): a bio holding `<|endoftext|>` would put a document separator inside the
  document. Refused in the record, naming the field."""
  import re
  tok = tokenizer.train_tokenizer(300, ["born in Boston"])
  ids = tok.encode(f"born in {special} Boston", add_special_tokens=False).ids
  assert tok.token_to_id(special) in ids                    # what the check prevents
  recs = person_records(2)
  r = recs[1]
  if field == "text":
    r["text"] += f" {special}"
  else:
    new = f"{r[field]} {special}"
    r.update({field: new, "text": r["text"].replace(r[field], new)})
  spec = write(tmp_path / "t.jsonl", recs)
  with pytest.raises(ConfigError, match=rf"^{tmp_path / 't.jsonl'} line 2: {field}: holds the "
                                        rf"tokenizer's special token '{re.escape(special)}'"):
    records.read_source(spec)


def test_a_value_holding_the_name_is_located(tmp_path):
  """George Mason studied at George Mason University: the name inside the value is the value's
  text, not the name's mention. Located without spans, accepted with the exact span given; a
  value found only inside the name is still an error, saying so."""
  name, uni = "George Mason", "George Mason University"
  text = ("George Mason was born on May 3, 1950 in Paris. He studied Law at George Mason "
          "University. He worked for Acme in Rome.")
  values = ("May 3, 1950", "Paris", uni, "Law", "Acme", "Rome")
  at = text.index(uni)
  want = [[text.index(v), text.index(v) + len(v)] for v in values]
  want[2] = [at, at + len(uni)]
  assert records.locate(text, name, values, {}).tolist() == want
  assert records.locate(text, name, values, {"university": (at, at + len(uni))}).tolist() == want
  rec = {"person": 0, "name": name, **dict(zip(ATTRIBUTES, values)), "text": text}
  corpus = records.read_source(write(tmp_path / "g.jsonl", [rec]))
  assert corpus.bio_spans[0].tolist() == want
  # the name's own mention is not the university: "George Mason" as a value is there only
  # inside the name (and inside the university, taken by then)
  with pytest.raises(ValueError, match=r"text: the company value 'George Mason' is only where "
                                       r"the name 'George Mason' is"):
    records.locate(text, name, (*values[:4], "George Mason", "Rome"), {})
  # a given span cutting across the name still overlaps it
  with pytest.raises(ValueError, match=r"spans.university: \[7, 31\] overlaps the name"):
    records.locate("George Mason University alumnus George Mason", name,
                   (*values[:2], "Mason University alumnus", *values[3:]),
                   {"university": (7, 31)})
  # a value genuinely missing is still "not in the bio"
  with pytest.raises(ValueError, match=r"text: the university value 'Mason College' is not in "
                                       r"the bio"):
    records.locate(text, name, (*values[:2], "Mason College", *values[3:]), {})
