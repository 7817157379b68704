"""Pools, templates, bio and QA rendering: spans, names, pronouns, augmentation, QA prompts."""

import re

import numpy as np
import pytest

from kstore_jax.data import pools as pools_lib
from kstore_jax.data import population, render, sources, templates, tokenizer
from kstore_jax.data.templates import ATTRIBUTES

N = 60
EOT = tokenizer.EOT


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train_tokenizer(4096)


@pytest.fixture(scope="module")
def renderer(tok):
  return render.Renderer(tok)


@pytest.fixture(scope="module")
def pop():
  return population.make_population(0, N)


def bio_source(renderer, pop, seed=0, people=None, **aug):
  people = np.arange(len(pop)) if people is None else people
  return sources.BioSource(renderer, pop, people, render.AugSpec(**aug), seed)


def doc_list(docs):
  return [docs.tokens[docs.offsets[i]:docs.offsets[i + 1]] for i in range(len(docs))]


def sentence_order(spans):
  """Attributes in the order their sentences appear in the bio."""
  return tuple(np.argsort(spans[:, 0]).tolist())


# -- pools and templates ----------------------------------------------------------------------

def test_pool_counts_and_no_duplicates():
  p = pools_lib.load_pools()
  counts = {"first_names": 400, "middle_names": 400, "last_names": 1000,
            "birth_cities": 200, "universities": 300, "majors": 100, "companies": 263}
  for name, n in counts.items():
    values = getattr(p, name)
    assert len(values) == n, name
    assert len(set(values)) == n, f"duplicates in {name}"
    assert all(v and v == v.strip() and "\n" not in v for v in values), name
  assert len(p.company_hq) == 263
  assert set(p.company_hq.tolist()) == set(range(len(p.hq_cities)))
  # Name parts are single words (full names split back into three parts).
  for name in ("first_names", "middle_names", "last_names"):
    assert all(" " not in v for v in getattr(p, name)), name


def test_templates_per_attribute():
  temps = templates.load_templates()
  assert tuple(temps) == ATTRIBUTES
  for a in ATTRIBUTES:
    assert len(temps[a]) >= 50, a
    assert len(set(temps[a])) == len(temps[a]), f"duplicate templates for {a}"
    for mid, tail in temps[a]:
      assert mid.startswith(" ") or mid.startswith("'"), (a, mid)
      assert tail.endswith("."), (a, tail)
  with pytest.raises(ValueError):
    templates.split_template("He was born on {value}.")


# -- bios -------------------------------------------------------------------------------------

AUGS = [dict(), dict(fullname=True), dict(permute=True, permute_copies=3),
        dict(multi=3), dict(multi=2, permute=True, permute_copies=2, fullname=True)]


@pytest.mark.parametrize("aug", AUGS, ids=str)
def test_values_at_spans(renderer, pop, aug):
  src = bio_source(renderer, pop, **aug)
  idx = np.arange(len(src))
  docs, spans = src.docs(idx), src.spans(idx)
  people, _ = src.locate(idx)
  assert spans.shape == (len(src), 6, 2)
  for toks, sp, person in zip(doc_list(docs), spans, people):
    values = pop.values(person)
    assert toks[0] == renderer.eot_id and toks[-1] == renderer.eot_id
    assert (sp[:, 0] < sp[:, 1]).all() and sp.min() >= 1 and sp.max() < len(toks)
    for a, name in enumerate(ATTRIBUTES):
      text = renderer.decode(toks[sp[a, 0]:sp[a, 1]])
      assert text.startswith(" ") and text.strip() == values[name], (name, text)
    # Spans do not overlap.
    by_start = sp[np.argsort(sp[:, 0])]
    assert (by_start[1:, 0] >= by_start[:-1, 1]).all(), sp


def test_item_matches_docs(renderer, pop):
  src = bio_source(renderer, pop, multi=2, permute=True)
  for i in (0, 1, 7, len(src) - 1):
    item = src[i]
    d = src.docs([i])
    np.testing.assert_array_equal(item["tokens"], d.tokens)
    np.testing.assert_array_equal(item["loss"], d.loss)
    np.testing.assert_array_equal(item["spans"], src.spans([i])[0])
    assert item["person"] == i // 2 and item["copy"] == i % 2
    assert not item["loss"][0] and item["loss"][1:].all()


@pytest.mark.parametrize("fullname", [False, True])
@pytest.mark.parametrize("permute", [False, True])
def test_names_and_pronouns(renderer, pop, fullname, permute):
  src = bio_source(renderer, pop, fullname=fullname, permute=permute, multi=2)
  idx = np.arange(len(src))
  people, _ = src.locate(idx)
  for toks, person in zip(doc_list(src.docs(idx)), people):
    text = renderer.decode(toks)
    assert text.startswith(EOT) and text.endswith(EOT)
    body = text[len(EOT):-len(EOT)]
    name = pop.full_name(person)
    pronoun, other = ("He", "She") if pop.gender[person] == 0 else ("She", "He")
    assert body.startswith(" " + name), body      # the first sentence names the person
    starts = re.findall(r"\. (He|She)\b", body)
    if fullname:
      assert body.count(name) == 6, body
      assert starts == [] and not re.search(r"\b(He|She)\b", body), body
    else:
      assert body.count(name) == 1, body
      assert starts == [pronoun] * 5, body
      assert not re.search(rf"\b{other}\b", body), body


def test_unpermuted_order_is_attribute_order(renderer, pop):
  src = bio_source(renderer, pop, multi=3)
  spans = src.spans(np.arange(len(src)))
  assert all(sentence_order(s) == tuple(range(6)) for s in spans)


@pytest.mark.parametrize("copies", [1, 2, 5])
def test_permute_keeps_facts_and_varies_order(renderer, pop, copies):
  plain = bio_source(renderer, pop)
  perm = bio_source(renderer, pop, permute=True, permute_copies=copies)
  assert len(perm) == N * copies
  pd, ps = plain.docs(np.arange(N)), plain.spans(np.arange(N))
  qd, qs = perm.docs(np.arange(len(perm))), perm.spans(np.arange(len(perm)))
  plain_docs, perm_docs = doc_list(pd), doc_list(qd)
  orders = []
  for person in range(N):
    ref = sorted(renderer.decode(plain_docs[person][a:b]) for a, b in ps[person])
    person_orders = []
    for c in range(copies):
      i = person * copies + c
      got = sorted(renderer.decode(perm_docs[i][a:b]) for a, b in qs[i])
      assert got == ref
      # Same template draw: the same six sentences, reordered.
      assert len(perm_docs[i]) == len(plain_docs[person])
      assert sorted(perm_docs[i].tolist()) == sorted(plain_docs[person].tolist())
      person_orders.append(sentence_order(qs[i]))
    assert len(set(person_orders)) == copies, person_orders   # pairwise different orders
    orders += person_orders
  assert len(set(orders)) > N // 2       # orders vary across people too


def test_multi_differs_in_wording_not_facts(renderer, pop):
  src = bio_source(renderer, pop, multi=5)
  idx = np.arange(len(src))
  docs, spans = doc_list(src.docs(idx)), src.spans(idx)
  for person in range(N):
    texts = [renderer.decode(docs[person * 5 + c]) for c in range(5)]
    assert len(set(texts)) == 5, texts
    facts = {tuple(renderer.decode(docs[person * 5 + c][a:b]) for a, b in spans[person * 5 + c])
             for c in range(5)}
    assert len(facts) == 1
  # Copies of the single template draw of multi=1 are the first copy of multi=5.
  one = bio_source(renderer, pop)
  for person in range(0, N, 7):
    np.testing.assert_array_equal(one[person]["tokens"], src[person * 5]["tokens"])


def test_same_seed_same_tokens(tok, renderer):
  aug = dict(multi=2, permute=True, permute_copies=2, fullname=False)
  a = bio_source(renderer, population.make_population(5, N), seed=5, **aug)
  b = bio_source(render.Renderer(tok), population.make_population(5, N), seed=5, **aug)
  c = bio_source(renderer, population.make_population(5, N), seed=6, **aug)
  idx = np.arange(len(a))
  da, db, dc = a.docs(idx), b.docs(idx), c.docs(idx)
  np.testing.assert_array_equal(da.tokens, db.tokens)
  np.testing.assert_array_equal(da.offsets, db.offsets)
  np.testing.assert_array_equal(a.spans(idx), b.spans(idx))
  assert any(not np.array_equal(x, y) for x, y in zip(doc_list(da), doc_list(dc)))
  # Any order, any subset: a bio renders the same alone as in a batch.
  rev = idx[::-1]
  for i, toks in zip(rev, doc_list(a.docs(rev))):
    np.testing.assert_array_equal(toks, doc_list(da)[i])


def test_bio_tokens_are_the_tokenization_of_the_text(tok, renderer, pop):
  src = bio_source(renderer, pop, multi=2, permute=True)
  for toks in doc_list(src.docs(np.arange(len(src)))):
    assert renderer.encode(renderer.decode(toks[1:-1])).tolist() == toks[1:-1].tolist()


# -- QA ---------------------------------------------------------------------------------------

def test_qa_answers_equal_bio_spans(renderer, pop):
  people = np.arange(0, N, 2)
  qa = sources.QASource(renderer, pop, people)
  bios = bio_source(renderer, pop, people=people, multi=2, permute=True)
  assert len(qa) == 6 * len(people)
  qdocs = doc_list(qa.docs(np.arange(len(qa))))
  qloss = qa.docs(np.arange(len(qa))).loss
  qoff = qa.docs(np.arange(len(qa))).offsets
  bdocs, bspans = doc_list(bios.docs(np.arange(len(bios)))), bios.spans(np.arange(len(bios)))
  for i, toks in enumerate(qdocs):
    person, attr = qa.locate([i])
    assert person[0] == people[i // 6] and attr[0] == i % 6
    loss = qloss[qoff[i]:qoff[i + 1]]
    # Loss is a suffix: the answer value and the final EOT.
    first = int(np.flatnonzero(loss)[0])
    assert loss[first:].all() and not loss[:first].any()
    assert toks[-1] == renderer.eot_id
    answer = toks[first:-1]
    for c in range(2):
      j = (i // 6) * 2 + c
      a, b = bspans[j, i % 6]
      np.testing.assert_array_equal(answer, bdocs[j][a:b])
    assert renderer.decode(answer).strip() == pop.values(person[0])[ATTRIBUTES[i % 6]]
    item = qa[i]
    np.testing.assert_array_equal(item["tokens"], toks)
    assert item["person"] == person[0] and item["attribute"] == attr[0]


def test_qa_prompt_text_is_pinned(tok, renderer, pop):
  qa = sources.QASource(renderer, pop, np.arange(N))
  for person in range(N):
    name, values = pop.full_name(person), pop.values(person)
    for a, attr in enumerate(ATTRIBUTES):
      item = qa[person * 6 + a]
      toks, loss = item["tokens"], item["loss"]
      first = int(np.flatnonzero(loss)[0])
      q0, q1 = templates.QUESTIONS[attr]
      prompt = f"{q0} {name}{q1}"
      assert renderer.decode(toks) == f"{EOT}{prompt} {values[attr]}{EOT}"
      assert renderer.decode(toks[:first]) == EOT + prompt
      assert renderer.decode(toks[first:-1]) == " " + values[attr]
      # The eval prompt (the question text, tokenized) is a prefix of the training doc.
      q = renderer.encode(prompt).tolist()
      assert toks[1:1 + len(q)].tolist() == q and 1 + len(q) == first
  item = qa[0]
  assert renderer.decode(item["tokens"]) == (
      f"{EOT}What is the birth date of {pop.full_name(0)}?\nAnswer: "
      f"{pop.values(0)['birth_date']}{EOT}")


# -- the bioS rows ------------------------------------------------------------------------

ROWS = {
    "single": (1, False, 1, False),
    "single_fullname": (1, False, 1, True),
    "single_permute1": (1, True, 1, False),
    "single_permute2": (1, True, 2, False),
    "single_permute5": (1, True, 5, False),
    "multi2": (2, False, 1, False),
    "multi2_permute": (2, True, 1, False),
    "multi5": (5, False, 1, False),
    "multi5_fullname": (5, False, 1, True),
    "multi5_permute": (5, True, 1, False),
    "multi5_permute_fullname": (5, True, 1, True),
}


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bios_rows_render(renderer, row):
  multi, permute, permute_copies, fullname = ROWS[row]
  n = 30
  pop = population.make_population(1, n)
  aug = render.AugSpec(multi, permute, permute_copies, fullname)
  assert aug.copies == multi * permute_copies
  src = sources.BioSource(renderer, pop, np.arange(n), aug, seed=1)
  assert len(src) == n * aug.copies
  idx = np.arange(len(src))
  docs, spans = src.docs(idx), src.spans(idx)
  assert len(docs) == len(src)
  people, copies = src.locate(idx)
  np.testing.assert_array_equal(people, np.repeat(np.arange(n), aug.copies))
  np.testing.assert_array_equal(copies, np.tile(np.arange(aug.copies), n))
  texts = []
  for i, toks in enumerate(doc_list(docs)):
    assert toks[0] == toks[-1] == renderer.eot_id
    assert (toks[1:-1] != renderer.eot_id).all()
    vals = pop.values(people[i])
    for a, attr in enumerate(ATTRIBUTES):
      assert renderer.decode(toks[spans[i, a, 0]:spans[i, a, 1]]).strip() == vals[attr]
    texts.append(renderer.decode(toks))
  # Every copy of a person is a distinct document, except with nothing to vary.
  per_person = [set(texts[p * aug.copies:(p + 1) * aug.copies]) for p in range(n)]
  assert all(len(s) == aug.copies for s in per_person)
  orders = {sentence_order(s) for s in spans}
  assert (len(orders) > 1) == permute
  assert all(t.count(pop.full_name(p)) == (6 if fullname else 1)
             for t, p in zip(texts, people))


def test_generated_tokenizer_cache(tmp_path, monkeypatch):
  """The generated world's BPE kept in train.tokenizer_cache: the file is the trained one; a
  later process reads it instead of training (training refused here); an entry cut short is
  trained again and replaced; another vocabulary size is another file; '' writes nothing."""
  from configs import base
  monkeypatch.delenv(tokenizer.CACHE_ENV, raising=False)   # (conftest's, for the whole run)
  cfg = base.get_config("tiny")
  cfg.data.vocab_size = 1024
  cfg.train.tokenizer_cache = str(tmp_path / "cache")
  fresh = tokenizer.train_tokenizer(1024).to_str()
  tokenizer._generated_tokenizer_json.cache_clear()   # as in a new process
  assert tokenizer.of_config(cfg).to_str() == fresh
  path = tokenizer.cached_bpe_path(cfg.train.tokenizer_cache, 1024)
  assert open(path).read() == fresh and len(list((tmp_path / "cache").iterdir())) == 1
  tokenizer._generated_tokenizer_json.cache_clear()
  real_train = tokenizer.train_tokenizer
  with monkeypatch.context() as m:
    m.setattr(tokenizer, "train_tokenizer", lambda *a: pytest.fail("trained despite the cache"))
    assert tokenizer.of_config(cfg).to_str() == fresh
  with open(path, "w") as f:
    f.write(fresh[:len(fresh) // 2])
  tokenizer._generated_tokenizer_json.cache_clear()
  assert tokenizer.of_config(cfg).to_str() == fresh and open(path).read() == fresh
  assert tokenizer.train_tokenizer is real_train
  assert tokenizer.cached_bpe_path(cfg.train.tokenizer_cache, 2048) != path
  cfg.train.tokenizer_cache = ""
  tokenizer._generated_tokenizer_json.cache_clear()
  assert tokenizer.of_config(cfg).to_str() == fresh
  assert len(list((tmp_path / "cache").iterdir())) == 1
  tokenizer._generated_tokenizer_json.cache_clear()
