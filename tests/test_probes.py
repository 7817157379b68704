"""P- and Q-probing: probed positions and labels are exact, a probe reads out a linearly
encoded label, a probe on a random model stays at chance (no leak of the value into the probed
position), the base model is frozen, and the probe stages run end to end and resume."""

import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runs import run_main

from configs import base as base_cfg
from kstore_jax import experiment
from kstore_jax.data import pools as pools_lib
from kstore_jax.data import classes, population, probing, records, tokenizer as tokenizer_lib
from kstore_jax.data import world as world_lib
from kstore_jax.data.population import MONTHS
from kstore_jax.data.render import N_ATTR
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.model import probes
from kstore_jax.train import optim, step as step_lib

EOT = tokenizer_lib.EOT
N_PEOPLE = 60
# (data overrides) of the worlds whose probe inputs are checked token by token.
AUGS = {
    "single": dict(multi=1, permute=False),
    "multi5_permute": dict(multi=5, permute=True),
    "multi2_permute2_fullname": dict(multi=2, permute=True, permute_copies=2, fullname=True),
}


# -- fixtures ------------------------------------------------------------------------------
@functools.cache
def tokenizer(vocab: int):
  return tokenizer_lib.train_tokenizer(vocab)


@functools.cache
def world(aug: str, vocab: int = 8192, n_people: int = N_PEOPLE):
  cfg = base_cfg.get_config("tiny")
  cfg.data.update(n_people=n_people, **AUGS[aug])
  return world_lib.build_world(cfg, tokenizer(vocab))


def paths(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.array(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -- 1. probed positions ---------------------------------------------------------------------
def sentences(text: str, world, person: int) -> list[tuple[int, int]]:
  """(start, end) character ranges of the six sentences of a decoded bio (EOTs excluded)."""
  assert text.startswith(EOT) and text.endswith(EOT)
  subj = "|".join(re.escape(s) for s in ("He", "She", world.pop.full_name(person)))
  ends = [m.end() for m in re.finditer(rf"\.(?= (?:{subj}) )", text)] + [len(text) - len(EOT)]
  starts = [len(EOT)] + ends[:-1]
  return list(zip(starts, ends))


# vocab 1024 splits names and values into several tokens; 8192 is the configs' tokenizer.
@pytest.mark.parametrize("aug", list(AUGS))
@pytest.mark.parametrize("vocab", [1024, 8192])
def test_pprobe_positions_are_the_token_before_each_value(aug, vocab):
  w = world(aug, vocab)
  dec = w.renderer.decode
  copies_per_person = w.aug.copies
  people = np.repeat(np.arange(0, N_PEOPLE, 7), copies_per_person)
  copies = np.tile(np.arange(copies_per_person), len(people) // copies_per_person)
  (tokens, seg), at, labels = probing.pprobe_examples(w, people, copies)
  assert at.shape == labels.shape == (len(people), N_ATTR)
  np.testing.assert_array_equal(labels, classes.probe_labels(w.pop, people))
  # The probe input is exactly the training bio (same template draw and sentence order).
  idx = people * copies_per_person + copies
  docs = w.bios().docs(idx)
  _, order = w.bios().pieces(idx)
  seen_orders = set()
  for i, person in enumerate(people):
    n = int(docs.lengths[i])
    np.testing.assert_array_equal(tokens[i, :n], docs.doc(i)["tokens"])
    assert (seg[i, :n] == 1).all() and (seg[i, n:] == 0).all()
    assert (tokens[i, n:] == w.pad_id).all()
    assert np.all(np.diff(at[i]) > 0), at[i]
    assert 0 < at[i, 0] and at[i, -1] < n - 1
    text = dec(tokens[i, :n])
    sents = sentences(text, w, person)
    assert len(sents) == N_ATTR, text
    values = w.pop.values(person)
    seen_orders.add(tuple(order[i]))
    for k in range(N_ATTR):
      value = " " + values[ATTRIBUTES[order[i, k]]]
      prefix = dec(tokens[i, :at[i, k] + 1])
      assert text.startswith(prefix)
      start, end = sents[k]
      # The probed token is the last one before the value, inside sentence k.
      assert start < len(prefix) < end, (k, prefix, text)
      assert text[len(prefix):end].startswith(value), (k, text[len(prefix):end], value)
      # ... and the value is exactly the next tokens.
      n_value = len(w.renderer.encode(value))
      assert dec(tokens[i, at[i, k] + 1:at[i, k] + 1 + n_value]) == value
  if w.aug.permute:
    assert len(seen_orders) > 1   # permuted worlds do probe other sentence orders
  else:
    assert seen_orders == {tuple(range(N_ATTR))}


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_qprobe_examples_are_the_name(vocab):
  w = world("single", vocab)
  people = np.arange(N_PEOPLE)
  (tokens, seg), at, labels = probing.qprobe_examples(w, people)
  assert at.shape == (N_PEOPLE, 1)
  np.testing.assert_array_equal(labels, classes.probe_labels(w.pop, people))
  lengths = seg.sum(1)
  assert len(set(lengths)) > 1          # names of different token lengths: padding is exercised
  for i, person in enumerate(people):
    n = int(lengths[i])
    assert (seg[i, :n] == 1).all() and (tokens[i, n:] == w.pad_id).all()
    assert w.renderer.decode(tokens[i, :n]) == EOT + " " + w.pop.full_name(person)
    assert at[i, 0] == n - 1              # the last token of the last name
  assert tokens.shape[1] <= probing.probe_width(w, "qprobe")
  if vocab == 1024:
    assert (lengths > 4).any()            # some name is more than 3 tokens


@pytest.mark.parametrize("kind", ["pprobe", "qprobe"])
def test_probe_batches_pad_to_width(kind):
  w = world("multi5_permute")
  width = probing.probe_width(w, kind)
  b = probing.ProbeBatches(w, w.train_people, kind, 8, width, seed=3)
  batch = b[5]
  assert batch["tokens"].shape == batch["segment_ids"].shape == (8, width)
  assert batch["probe_at"].shape == (8, N_ATTR if kind == "pprobe" else 1)
  assert (batch["probe_at"] < batch["segment_ids"].sum(1)[:, None]).all()
  # The padded examples are the unpadded ones.
  idx = np.arange(8)
  raw = b.examples(idx)
  if kind == "pprobe":
    person, copy = np.divmod(idx, w.aug.copies)
    (tok, _), at, _ = probing.pprobe_examples(w, w.train_people[person], copy)
  else:
    (tok, _), at, _ = probing.qprobe_examples(w, w.train_people[idx])
  np.testing.assert_array_equal(raw["tokens"][:, :tok.shape[1]], tok)
  np.testing.assert_array_equal(raw["probe_at"], at)
  # The longest bio of the population fits.
  if kind == "pprobe":
    all_bios = w.bios().docs(np.arange(len(w.bios())))
    assert all_bios.lengths.max() <= width


def test_qprobe_width_fits_an_imported_worlds_longest_name(tmp_path):
  """An imported world's names are its roster's, not the pools': the Q-probe width is its
  longest name's, so a batch holding a name longer than any pool name still pads (not fails)."""
  pop = population.make_population(0, 4)
  long = "María José de la Concepción Fernández-Núñez y Gómez"
  recs = []
  for p in range(4):
    name = long if p == 0 else pop.full_name(p)
    v = pop.values(p)
    recs.append({"person": p, "name": name, **v, "text": (
        f"{name} was born on {v['birth_date']} in {v['birth_city']}, studied {v['major']} at "
        f"{v['university']} and works for {v['company']} in {v['company_city']}.")})
  records.write_jsonl(recs, str(tmp_path / "bios.jsonl"))
  tokenizer(1024).save(str(tmp_path / "tok.json"))   # the pools' tokenizer: long names split
  cfg = base_cfg.get_config("tiny")
  cfg.data.update(source=f"jsonl:{tmp_path / 'bios.jsonl'}",
                  tokenizer_path=str(tmp_path / "tok.json"))
  w = world_lib.build_world(cfg, tokenizer_lib.get_tokenizer(cfg.data))
  (tokens, _), _, _ = probing.qprobe_examples(w, np.arange(4))
  width = probing.probe_width(w, "qprobe")
  assert width == tokens.shape[1]          # [EOT] + the long name, exactly
  batch = probing.ProbeBatches(w, np.arange(4), "qprobe", 4, width, seed=0)[0]
  assert batch["tokens"].shape == (4, width)


# -- 2. labels ---------------------------------------------------------------------------------
def test_labels_are_the_attribute_values():
  w = world("single")
  p = pools_lib.load_pools()
  pool = {"birth_city": p.birth_cities, "university": p.universities, "major": p.majors,
          "company": p.companies, "company_city": p.hq_cities}
  people = np.arange(N_PEOPLE)
  labels = classes.probe_labels(w.pop, people)
  assert labels.shape == (N_PEOPLE, N_ATTR) and labels.dtype == np.int32
  counts = classes.n_classes(w.pop)
  assert counts == [12] + [len(pool[a]) for a in ATTRIBUTES[1:]]
  assert (labels >= 0).all() and (labels < np.array(counts)).all()
  for person in people:
    values = w.pop.values(person)
    assert values["birth_date"].split()[0] == MONTHS[labels[person, 0]]
    for a, name in enumerate(ATTRIBUTES[1:], 1):
      assert pool[name][labels[person, a]] == values[name], (person, name)
    # company city is the company's HQ (a class of the HQ list, not of the birth cities)
    assert labels[person, 5] == p.company_hq[labels[person, 4]]


def train_adam(loss_fn, probe, hidden_by_step, labels_by_step, lr=1e-2):
  """One Adam step per leading index of (hidden, labels), in one jitted scan: the trained probe
  and the per-step losses of `loss_fn(probe, hidden, labels)`."""
  opt = optax.adam(lr)

  def body(carry, batch):
    probe, opt_state = carry
    loss, g = jax.value_and_grad(loss_fn)(probe, *batch)
    updates, opt_state = opt.update(g, opt_state, probe)
    return (optax.apply_updates(probe, updates), opt_state), loss

  run = jax.jit(lambda p, h, y: jax.lax.scan(body, (p, opt.init(p)), (h, y)))
  (probe, _), losses = run(probe, hidden_by_step, labels_by_step)
  return probe, losses


# -- 3. a probe reads out a linearly encoded label ---------------------------------------------
def test_probe_learns_linearly_encoded_labels():
  """Hidden states that encode the six labels linearly (one-hot codes of each attribute in its
  own coordinates, then a random rotation per position, plus noise): trained alone, in process,
  every (position, attribute) classifier reaches >= 98% on held-out draws.

  Class counts are small so that the codes fit in D = 64 (probe_apply takes any class list);
  the real class list is checked for shapes."""
  D, P = 64, N_ATTR
  counts = [12, 10, 12, 8, 10, 8]                       # 60 one-hot coordinates <= D
  offsets = np.cumsum([0] + counts[:-1])
  rng = np.random.default_rng(0)
  rot = np.linalg.qr(rng.normal(size=(P, D, D)))[0]     # [P, D, D] orthogonal

  def sample(n):
    labels = np.stack([rng.integers(0, c, n) for c in counts], -1)
    code = np.zeros((n, D), np.float32)
    np.put_along_axis(code, labels + offsets, 1.0, axis=1)
    hidden = np.einsum("nd,pde->npe", code, rot) + 0.05 * rng.normal(size=(n, P, D))
    return hidden.astype(np.float32), labels.astype(np.int32)

  def loss_fn(probe, hidden, labels):
    ce = [optax.softmax_cross_entropy_with_integer_labels(
              lg, jnp.broadcast_to(labels[:, None, a], lg.shape[:2])).mean()
          for a, lg in enumerate(probes.probe_apply(probe, hidden))]
    return jnp.mean(jnp.stack(ce))

  # rbg keys: XLA compiles threefry's random normals slowly on CPU (seconds per init).
  k_probe = jax.random.key(0, impl="rbg")
  init = jax.jit(functools.partial(probes.init, vocab=16, d_model=D, embed_rank=2,
                                   n_positions=P, classes=counts))

  @jax.jit
  def accuracy(probe, hidden, labels):                  # [P, 6]
    return jnp.stack([(lg.argmax(-1) == labels[:, None, a]).mean(0)
                      for a, lg in enumerate(probes.probe_apply(probe, hidden))], -1)

  steps, batch = 200, 128
  hidden, labels = sample(steps * batch)
  probe0 = init(k_probe)
  probe, losses = train_adam(loss_fn, probe0, hidden.reshape(steps, batch, P, D),
                             labels.reshape(steps, batch, N_ATTR))
  assert losses[-1] < 0.1 * losses[0]
  test = sample(2000)                                   # held out: fresh draws
  acc = np.asarray(accuracy(probe, *test))
  assert acc.shape == (P, N_ATTR)
  assert acc.min() >= 0.98, np.round(acc, 3)
  assert np.asarray(accuracy(probe0, *test)).max() < 0.3    # untrained: chance level
  # With the real class list: one [P, D, C] head per attribute, embed_b starting at zero.
  counts = classes.n_classes(population.make_population(0, 2))
  real = jax.eval_shape(functools.partial(probes.init, vocab=16, d_model=D, embed_rank=2,
                                          n_positions=P, classes=counts), k_probe)
  assert [h["w"].shape for h in real["heads"]] == [(P, D, c) for c in counts]
  assert real["embed_a"].shape == (16, 2) and real["embed_b"].shape == (2, D)
  assert not np.asarray(probe0["embed_b"]).any()


def test_class_tokens_are_the_value_text():
  """The embedding head's class tokens decode to each class's value as bios write it."""
  w = world("single")
  p = pools_lib.load_pools()
  texts = [list(MONTHS), p.birth_cities, p.universities, p.majors, p.companies, p.hq_cities]
  tokens = classes.class_tokens(w.renderer, w.pop)
  assert [len(ids) for ids, _ in tokens] == classes.n_classes(w.pop)
  for (ids_CT, real_CT), values in zip(tokens, texts):
    for c, value in enumerate(values):
      assert w.renderer.decode(ids_CT[c][real_CT[c] > 0]) == " " + value


def test_embedding_head_reads_classes_through_their_values():
  """The embedding head's weights come through the class values' embeddings, so what it learns
  on some classes carries over to the others. Value embeddings span a 16-dim subspace of D = 64
  (as a model's token embeddings span a subspace shared by many values); hidden states carry
  each attribute's class vector (`class_vectors` of the value tokens) through a random rotation
  per attribute, summed over the six attributes, plus noise. Trained only on people whose
  classes are among the first 30 of 40, the embedding head names the 10 classes it never saw
  on held-out draws (measured 71-82% per attribute, chance 2.5%; asserted >= 60%); the linear
  head, on the same data, names almost none of them (<= 1%)."""
  D, V, T, C, SEEN, SUB = 64, 300, 2, 40, 30, 16
  rng = np.random.default_rng(0)
  table = rng.normal(size=(V, SUB)) @ rng.normal(size=(SUB, D))
  base = {"embed": {"embedding": jnp.asarray(table, jnp.float32)}}
  tokens = [(rng.integers(0, V, (C, T)).astype(np.int32), np.ones((C, T), np.float32))
            for _ in range(N_ATTR)]
  classes_CD = probes.class_vectors(base, tokens)
  rot = np.linalg.qr(rng.normal(size=(N_ATTR, D, D)))[0]

  def sample(n, lo, hi):
    labels = rng.integers(lo, hi, (n, N_ATTR))
    hidden = sum(np.asarray(classes_CD[a])[labels[:, a]] @ rot[a] for a in range(N_ATTR))
    hidden = hidden[:, None] + 0.02 * rng.normal(size=(n, 1, D))
    return hidden.astype(np.float32), labels.astype(np.int32)

  train_set, unseen = sample(300 * 64, 0, SEEN), sample(2000, SEEN, C)

  def fit(head):
    probe = probes.init(jax.random.key(0, impl="rbg"), vocab=16, d_model=D, embed_rank=2,
                        n_positions=1, classes=[C] * N_ATTR, head=head)

    def loss_fn(probe, hidden, labels):
      return jnp.mean(jnp.stack([
          optax.softmax_cross_entropy_with_integer_labels(lg[:, 0], labels[:, a]).mean()
          for a, lg in enumerate(probes.probe_apply(probe, hidden, classes_CD))]))

    hidden, labels = train_set
    probe, _ = train_adam(loss_fn, probe, hidden.reshape(300, 64, 1, D),
                          labels.reshape(300, 64, N_ATTR))
    hidden, labels = unseen
    return np.array([(lg[:, 0].argmax(-1) == labels[:, a]).mean() for a, lg in
                     enumerate(probes.probe_apply(probe, jnp.asarray(hidden), classes_CD))])

  embedding, linear = fit("embedding"), fit("linear")
  assert embedding.min() >= 0.6, embedding
  assert linear.max() <= 0.01, linear   # measured 0-0.1%: its unseen classes keep their random init


# -- 4./5. a probe on a random model -----------------------------------------------------------
RANDOM_PEOPLE, PROBE_STEPS, PROBE_BATCH, PROBE_LR = 600, 100, 32, 1e-2
RBG_KEY = jax.random.key(1, impl="rbg")   # threefry's normals compile slowly on CPU


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
  """An Experiment (the `single` row, non-permuted: sentence k holds attribute k) with a random
  2-layer d_model 32 model, and its probe stage specs."""
  cfg = base_cfg.get_config("tiny")
  cfg.data.n_people = RANDOM_PEOPLE
  cfg.model.update(num_layers=2, d_model=32, num_heads=2, d_ff=64)
  for s in ("pprobe", "qprobe"):
    cfg[s].update(steps=PROBE_STEPS, batch_size=PROBE_BATCH, lr=PROBE_LR)
  exp = experiment.Experiment(cfg, tokenizer(8192),
                              experiment.Workdir(str(tmp_path_factory.mktemp("probe_exp"))))
  init = jax.jit(lambda rng: nn.meta.unbox(
      exp.model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]))
  base = init(jax.random.key(0, impl="rbg"))
  return exp, base


def train_probes(exp, base, stage, shifts=(0,)):
  """For each shift: PROBE_STEPS steps of the stage's optimizer (AdamW, warmup + cosine,
  clipping) on the stage's own batch stream (the train half), every probed position moved
  right by `shift` tokens. Returns [(probe params, [P, 6] accuracy on the test half)]."""
  spec = exp.probe_spec(stage, base)
  hp = optim.hyperparams(spec.stage_cfg)
  optimizer = optim.make_optimizer(hp)
  step = jax.jit(step_lib.make_train_step(spec.loss_fn), donate_argnums=(0,))
  init_state = jax.jit(lambda rng: (lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                               "opt_state": optimizer.init(p)})(
                                                   spec.init_params(rng, spec.init_args)))
  accuracy = exp.probe_accuracy(stage)
  w = exp.world
  test = probing.ProbeBatches(w, w.test_people, stage, 0, probing.probe_width(w, stage), 0)
  test_batch = test.examples(np.arange(len(w.test_people))
                             * (w.aug.copies if stage == "pprobe" else 1))
  out = []
  for shift in shifts:
    state, data = init_state(RBG_KEY), iter(spec.data(0, 1))
    for _ in range(PROBE_STEPS):
      batch = next(data)
      state, metrics = step(state, base, {**batch, "probe_at": batch["probe_at"] + shift}, hp)
    assert np.isfinite(float(metrics["loss"]))
    acc = accuracy(base, state["params"],
                   {**test_batch, "probe_at": test_batch["probe_at"] + shift})
    out.append((state["params"], np.asarray(acc)))
  return out


def chance_bound(exp) -> tuple[np.ndarray, np.ndarray]:
  """(majority baseline, baseline + 3 standard errors) per attribute on the test half.

  A probe whose predictions carry no information about the test people's labels (their
  attributes are drawn independently of the name and templates it sees) scores on average at
  most the frequency of the class it predicts most, i.e. <= the majority baseline b; the
  per-person outcomes are independent, so the score's standard deviation is at most
  sqrt(b (1 - b) / n_test). 3 SE: a false alarm < 0.2% per entry in the normal approximation
  (< 5% over the 26 entries checked). With n_test = 300 the bound is 1.3-1.5x the baseline."""
  labels = classes.probe_labels(exp.world.pop, exp.world.test_people)
  n = len(labels)
  b = np.array([np.bincount(labels[:, a]).max() / n for a in range(N_ATTR)])
  return b, b + 3 * np.sqrt(b * (1 - b) / n)


@pytest.fixture(scope="module")
def random_probes(random_model):
  exp, base = random_model
  before = paths(base)
  out = {"before": before}
  out["pprobe"], out["pprobe_shifted"] = train_probes(exp, base, "pprobe", shifts=(0, 1))
  out["qprobe"], = train_probes(exp, base, "qprobe")
  return out


def test_random_model_probe_stays_at_chance(random_model, random_probes):
  exp, _ = random_model
  baseline, bound = chance_bound(exp)
  # Q-probe: only the name is seen.
  q = random_probes["qprobe"][1][0]
  assert (q <= bound).all(), (q, bound)
  # P-probe at position k (before sentence k's value): attribute a is not yet in the input for
  # a >= k (non-permuted world), so nothing can be decoded there; except company city at
  # position 5, which follows from the company (sentence 4).
  p = random_probes["pprobe"][1]
  unseen = np.triu(np.ones((N_ATTR, N_ATTR), bool))
  unseen[5, 5] = False
  assert (p[unseen] <= np.broadcast_to(bound, p.shape)[unseen]).all(), (np.round(p, 3), bound)
  # Control: probed one token later (at the value's first token), the same random model and
  # probe training decode every attribute of that sentence far above chance, so the bound
  # above would catch an off-by-one that let the value into the probed position.
  # (Measured: birth month 1.0, the other diagonal entries 0.3-0.8, bounds 0.03-0.2.)
  shifted = random_probes["pprobe_shifted"][1]
  assert shifted[0, 0] > 0.5 and (np.diag(shifted) > bound + 0.15).all(), (
      np.round(shifted, 3), bound)


@pytest.mark.parametrize("head", probes.HEADS)
def test_base_params_get_no_gradient(random_model, head):
  exp, base = random_model
  exp.cfg.pprobe.head = head
  try:
    spec = exp.probe_spec("pprobe", base)
  finally:
    exp.cfg.pprobe.head = "linear"
  probe = jax.jit(spec.init_params)(RBG_KEY, spec.init_args)
  w = exp.world
  batch = probing.ProbeBatches(w, w.train_people, "pprobe", 4, probing.probe_width(w, "pprobe"),
                               0)[0]
  grad_base, grad_probe = jax.jit(jax.grad(lambda b, p: spec.loss_fn(p, b, batch)[0],
                                           argnums=(0, 1)))(base, probe)
  assert all((g == 0).all() for g in paths(grad_base).values())
  # The probe does get gradients, the embedding update included (embed_b starts at zero).
  assert np.abs(np.asarray(grad_probe["embed_b"])).max() > 0
  weights = "w" if head == "linear" else "m"
  assert all(np.abs(np.asarray(h[weights])).max() > 0 for h in grad_probe["heads"])


def test_base_params_unchanged_after_probe_training(random_model, random_probes):
  exp, base = random_model
  before, after = random_probes["before"], paths(base)
  assert before.keys() == after.keys()
  for k in before:   # bitwise, after 3 x 100 steps with the state donated
    assert before[k].tobytes() == after[k].tobytes(), k
  for stage in ("pprobe", "qprobe"):
    probe = random_probes[stage][0]
    assert np.abs(np.asarray(probe["embed_b"])).max() > 0, stage   # moved from zero
    assert probe["embed_b"].shape == (exp.cfg[stage].embed_rank, exp.cfg.model.d_model)


# -- 6. end to end -----------------------------------------------------------------------------
E2E = ["--config=configs/multi5_permute.py:tiny", "--config.data.n_people=60",
       "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
       "--config.model.d_ff=64", "--config.pretrain.steps=6", "--config.pretrain.batch_size=4",
       "--config.pprobe.steps=4", "--config.qprobe.steps=4", "--config.pprobe.batch_size=4",
       "--config.qprobe.batch_size=4", "--config.stages=pretrain,pprobe,qprobe"]


def test_probe_stages_end_to_end_and_rerun(tmp_path, jax_cache):
  workdir = tmp_path / "run"

  def run():   # the session's compilation cache: the rerun loads the first run's executables
    r = run_main([f"--workdir={workdir}", *E2E], jax_cache, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr, json.loads((workdir / "results.json").read_text())

  out1, res1 = run()
  pp = np.array(res1["pprobe"])
  assert pp.shape == (N_ATTR, N_ATTR) and ((pp >= 0) & (pp <= 1)).all()
  assert set(res1["qprobe"]) == set(ATTRIBUTES) | {"mean"}
  assert all(0 <= v <= 1 for v in res1["qprobe"].values())
  assert res1["qprobe"]["mean"] == pytest.approx(np.mean([res1["qprobe"][a]
                                                           for a in ATTRIBUTES]))
  assert set(res1["probe_baseline"]) == set(ATTRIBUTES)
  assert all(0 < v <= 1 for v in res1["probe_baseline"].values())
  for stage in ("pprobe", "qprobe"):
    assert (workdir / stage / "final").is_dir()
  assert "already done" not in out1
  out2, res2 = run()
  for stage in ("pretrain", "pprobe", "qprobe"):
    assert f"[{stage}] already done" in out2, out2[-2000:]
  assert res2 == res1


def test_padded_batch_trains_as_the_unpadded_one(random_model):
  """A probe batch of 5 examples padded to 8 rows (a mesh of 8 data-parallel devices) gives
  the unpadded batch's loss, gradients and accuracies: the padding rows weigh nothing (the
  weighting is the loss's, whatever the head). The control counts them (weight 1) and gets
  another loss."""
  exp, base = random_model
  spec = exp.probe_spec("pprobe", base)
  w = exp.world
  make = functools.partial(probing.ProbeBatches, w, w.train_people, "pprobe", 5,
                           probing.probe_width(w, "pprobe"), 3)
  plain, padded = make()[2], make(rows=probing.padded_rows(5, 8))[2]
  assert len(padded["tokens"]) == 8 and padded["row_weights"].tolist() == [1] * 5 + [0] * 3
  for k, v in plain.items():
    np.testing.assert_array_equal(padded[k][:5], v, err_msg=k)
  assert (padded["segment_ids"][5:].sum(1) > 0).all()   # real inputs, not empty rows
  probe = jax.jit(spec.init_params)(RBG_KEY, spec.init_args)
  grad = jax.jit(jax.value_and_grad(lambda p, b: spec.loss_fn(p, base, b), has_aux=True))
  (loss, aux), g = grad(probe, plain)
  (loss_p, aux_p), g_p = grad(probe, padded)
  np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
  np.testing.assert_allclose(float(aux_p["probe_acc"]), float(aux["probe_acc"]), rtol=1e-6)
  # (float sums over 5 rows or 8: an element near 0 differs by the leaf's rounding, 1.9e-7 of
  # a leaf up to ~1 seen in a process of its own, so the absolute tolerance is the leaf's)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_p)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                               atol=1e-5 * float(np.abs(a).max()),
                               err_msg=jax.tree_util.keystr(path))
  acc = exp.probe_accuracy("pprobe")
  np.testing.assert_allclose(np.asarray(acc(base, probe, padded)),
                             np.asarray(acc(base, probe, plain)), rtol=1e-6)
  counted = {**padded, "row_weights": np.ones(8, np.float32)}
  assert abs(float(grad(probe, counted)[0][0]) - float(loss)) > 1e-4
