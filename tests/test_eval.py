"""QA evaluation: KV-cache generation, exact match, memorisation -> 100%, bio recall, loss mask."""

import dataclasses
import json
import pathlib
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import runs
from configs import base
from kstore_jax.data import pipeline, tokenizer as tokenizer_lib, world as world_lib
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.eval import generate, qa_eval
from kstore_jax.model.transformer import ModelConfig, Transformer, model_vocab
from kstore_jax.train import loop, step as step_lib

N_PEOPLE = 4


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_tokenizer(8192)


@pytest.fixture(scope="module")
def world(tok):
  cfg = base.get_config("tiny")
  cfg.data.n_people = N_PEOPLE
  return world_lib.build_world(cfg, tok)


def make_model(world, seed=0, **kw):
  mc = ModelConfig(vocab_size=model_vocab(world.renderer), **{
      **dict(num_layers=2, num_heads=4, d_model=64, d_ff=256, rotary_fraction=0.5), **kw})
  model = Transformer(mc)
  init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))))
  params = init(jax.random.PRNGKey(seed))["params"]
  return model, params


def greedy_one(model, params, prompt, n):
  """Reference: one row without padding or segments, re-run in full for every token (causal
  masking alone keeps the unfilled tail out of the logits that are read)."""
  apply = jax.jit(lambda p, seq: model.apply({"params": p}, seq)[0])
  seq = np.zeros((1, len(prompt) + n), np.int32)
  seq[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    seq[0, t] = int(jnp.argmax(apply(params, seq)[0, t - 1]))
  return seq[0, len(prompt):]


def test_kv_cache_equals_recompute_ragged_batch(world):
  model, params = make_model(world)
  prompts, plens, answers, _, _ = qa_eval.qa_arrays(world, np.arange(N_PEOPLE))
  # Rows of very different lengths in one batch: real QA prompts plus truncated ones.
  cut = np.array([1, 3, 5, 8])
  short = prompts[:4].copy()
  for i, c in enumerate(cut):
    short[i, c:] = world.pad_id
  prompt_BP = np.concatenate([prompts, short])
  lens_B = np.concatenate([plens, cut]).astype(np.int32)
  assert len(set(lens_B.tolist())) >= 5
  max_new = answers.shape[1] + 2
  args = (model, params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), max_new)
  kv = np.asarray(generate.generate(*args))
  full = np.asarray(generate.generate_recompute(*args))
  assert kv.shape == (len(prompt_BP), max_new)
  np.testing.assert_array_equal(kv, full)
  np.testing.assert_array_equal(kv, generate.generate_recompute_fixed_width(*args))
  for b in (0, len(plens)):     # and both equal greedy decoding without padding
    ref = greedy_one(model, params, prompt_BP[b, :lens_B[b]], max_new)
    np.testing.assert_array_equal(kv[b], ref)
  one = (model, params, jnp.asarray(prompt_BP[:2, :1]), jnp.ones(2, jnp.int32), 3)
  np.testing.assert_array_equal(generate.generate(*one), generate.generate_recompute(*one))
  assert generate.generate_recompute(*one[:-1], 0).shape == (2, 0)


def test_qa_set_prompts_are_the_rendered_questions(world):
  people = np.arange(N_PEOPLE)
  qa = world.qa(people)
  pieces = qa.pieces(np.arange(len(qa)))
  whole, lens = world.renderer.render(pieces[:, :6], np.zeros(6, bool)).padded(world.pad_id)
  qs = qa_eval.qa_set(world, people)
  prompts, plens = qs.prompts(world.pad_id)
  np.testing.assert_array_equal(plens, lens)
  np.testing.assert_array_equal(prompts, whole)
  # one shared prefix per attribute: EOT + the words before the name
  assert qs.prefix_AS.shape[0] == len(ATTRIBUTES) and (qs.prefix_lens_A >= 2).all()
  sub = qs.take(np.array([5, 0, 7]))
  np.testing.assert_array_equal(sub.prompts(world.pad_id)[0],
                                prompts[[5, 0, 7], :sub.prompts(world.pad_id)[1].max()])


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_shared_prefix_generation_equals_recompute(world, attention):
  """Questions decoded with their attribute's prefix cached once give the tokens of full
  recompute on the whole questions (the fixed-width baseline), with early stopping at EOT;
  also through `jax.nn.dot_product_attention` (the GPU path, which reads the head-major cache
  transposed). The no-cache baseline, on whole questions and on the split ones (prefixes re-run
  once per step), gives them too (einsum: its code does not depend on the cache path)."""
  model, params = make_model(world, attention=attention)
  qs = qa_eval.qa_set(world, np.arange(N_PEOPLE))
  order = np.argsort(qs.rest_lens_N, kind="stable")[::-1]       # longest rest first
  qs = qs.take(order)
  prompts, plens = qs.prompts(world.pad_id)
  eot, max_new = world.renderer.eot_id, qs.answers_NW.shape[1] + 2
  shared = np.asarray(generate.generate(model, params, jnp.asarray(qs.rest_NR),
                                        jnp.asarray(qs.rest_lens_N), max_new, eot,
                                        qs.prefixes()))
  np.testing.assert_array_equal(shared, generate.generate_recompute_fixed_width(
      model, params, jnp.asarray(prompts), jnp.asarray(plens), max_new, eot))
  if attention == "einsum":   # the no-cache baseline's own code (no cache to read): once
    full = np.asarray(generate.generate_recompute(model, params, jnp.asarray(prompts),
                                                  jnp.asarray(plens), max_new, eot))
    np.testing.assert_array_equal(shared, full)
    baseline = np.asarray(generate.generate_recompute(
        model, params, jnp.asarray(qs.rest_NR), jnp.asarray(qs.rest_lens_N), max_new, eot,
        qs.prefixes()))
    np.testing.assert_array_equal(shared, baseline)
  plain = np.asarray(generate.generate(model, params, jnp.asarray(prompts), jnp.asarray(plens),
                                       max_new))
  # early stop: a row's tokens agree with the full run up to and including its first EOT
  for b in range(len(plain)):
    stop = np.flatnonzero(plain[b] == eot)
    upto = stop[0] + 1 if len(stop) else max_new
    np.testing.assert_array_equal(shared[b, :upto], plain[b, :upto])


def test_shared_widths_is_the_cheapest_choice():
  """shared_widths against every choice of widths tried by hand: each batch takes the least
  chosen width >= its longest question, the cost compile x widths + rows x widths summed."""
  import itertools
  rng = np.random.default_rng(0)
  for trial in range(40):
    longest = np.sort(rng.integers(3, 20, rng.integers(1, 9)))
    rows, compile_cost = int(rng.choice([8, 64, 512])), float(rng.choice([0, 50, 3e3, 1e5]))
    levels = np.unique(longest)
    best = np.inf
    for k in range(1, len(levels) + 1):
      for chosen in itertools.combinations(levels, k):
        if chosen[-1] != levels[-1]:
          continue   # the widest batch needs a width of its own length
        widths = [min(w for w in chosen if w >= l) for l in longest]
        best = min(best, compile_cost * k + rows * sum(widths))
    got = qa_eval.shared_widths(longest, rows, compile_cost)
    assert (got >= longest).all() and set(got) <= set(levels), (longest, got)
    assert compile_cost * len(set(got)) + rows * got.sum() == pytest.approx(best), trial
  # the two ends: compiling is free -> every batch its own width; dear -> one width
  longest = np.array([4, 5, 5, 9])
  assert qa_eval.shared_widths(longest, 64, 0).tolist() == [4, 5, 5, 9]
  assert qa_eval.shared_widths(longest, 64, 10 ** 9).tolist() == [9, 9, 9, 9]


@pytest.mark.parametrize("compile_positions", [0, 30, 10 ** 9])
def test_length_batches_cover_every_question_once(world, compile_positions):
  """Every question is a real row of exactly one batch, in a batch at least as wide as it
  (and its own rest tokens there), all batches of one row count; sorted by length, so with
  compiling free a batch is only as wide as its longest question, and dear, all one width."""
  qs = qa_eval.qa_set(world, np.arange(N_PEOPLE))
  batches = list(qa_eval.length_batches(qs, 7, row_multiple=4,
                                        compile_positions=compile_positions))
  real = np.concatenate([rows[:n] for rows, n, _ in batches])
  assert sorted(real.tolist()) == list(range(len(qs.attrs_N)))
  assert len({b.rest_NR.shape[0] for _, _, b in batches}) == 1
  for rows, n, b in batches:
    assert n <= 7 and (b.rest_lens_N == qs.rest_lens_N[rows]).all()
    for i, q in enumerate(rows):
      length = qs.rest_lens_N[q]
      np.testing.assert_array_equal(b.rest_NR[i, :length], qs.rest_NR[q, :length])
    if compile_positions == 0:
      assert b.rest_NR.shape[1] == b.rest_lens_N[:n].max()
  widths = [b.rest_NR.shape[1] for _, _, b in batches]
  assert widths == sorted(widths)
  if compile_positions == 10 ** 9:   # compiling dear: one shape
    assert len(set(widths)) == 1


def test_recompute_baseline_flops_between_cache_and_fixed_width(world):
  """generation_flops: the no-cache baseline (growing lengths, head on the last position,
  prefixes once per step) counts fewer FLOPs than the fixed-width one and more than the cache;
  checked against a count by hand for one batch. A prefix position only fills caches: its
  last layer's keys and values (2 x 2d^2) are all of that layer it needs."""
  from kstore_jax.eval.generate import generation_flops
  model, _ = make_model(world)
  qs = qa_eval.qa_set(world, np.arange(N_PEOPLE))
  batches = [b for _, _, b in qa_eval.length_batches(qs, 8, row_multiple=4)]
  max_new = qs.answers_NW.shape[1]
  f = generation_flops(model.cfg, batches, max_new)
  assert f["kv_cache"] < f["recompute"] < f["fixed_width"]
  c = model.cfg
  layer = 2 * (4 * c.d_model ** 2 + 2 * c.d_model * c.d_ff)
  body, fill = c.num_layers * layer, (c.num_layers - 1) * layer + 4 * c.d_model ** 2
  head = 2 * c.vocab_size * c.d_model
  b = batches[0]
  (rows, width), (A, S) = b.rest_NR.shape, b.prefix_AS.shape
  by_hand = sum(A * S * fill + rows * (width + t) * body + rows * head for t in range(max_new))
  one = generation_flops(c, batches[:1], max_new)
  assert one["recompute"] == by_hand
  assert one["kv_cache"] == (A * S + rows * (width - 1)) * fill + max_new * rows * (body + head)


def test_decoding_stops_once_every_row_ended():
  eos = 99
  ends_B = jnp.array([2, 0])         # the step at which each row first emits eos

  def step(tok_B, t, calls):
    del tok_B
    return jnp.where(t == ends_B, eos, t + 10), calls + 1

  out = np.asarray(jax.jit(lambda: generate._run(step, jnp.zeros(2, jnp.int32), 0, 6, eos))())
  # three steps (t = 0, 1, 2) ran; the columns never reached hold eos
  np.testing.assert_array_equal(out, [[10, 11, eos, eos, eos, eos], [eos, 11, 12, eos, eos, eos]])
  never = np.asarray(generate._run(step, jnp.zeros(2, jnp.int32), 0, 4, -1))
  np.testing.assert_array_equal(never, [[10, 11, eos, 13], [eos, 11, 12, 13]])


def test_answers_match_is_exact():
  eot, pad = 0, 1
  answers = np.array([[7, 8, 9, eot], [5, eot, pad, pad]])
  alens = np.array([4, 2])
  right = np.array([[7, 8, 9, eot, 3], [5, eot, 4, 4, 4]])   # past the EOT: ignored
  assert qa_eval.answers_match(right, answers, alens).tolist() == [True, True]
  wrong_last = right.copy()
  wrong_last[0, 2] = 10                                       # last value token
  assert qa_eval.answers_match(wrong_last, answers, alens).tolist() == [False, True]
  wrong_eot = right.copy()
  wrong_eot[0, 3] = 9                                          # no EOT after the value
  wrong_eot[1, 1] = 6
  assert qa_eval.answers_match(wrong_eot, answers, alens).tolist() == [False, False]
  prefix_only = right.copy()
  prefix_only[1, 0] = 6                                        # first token
  assert qa_eval.answers_match(prefix_only, answers, alens).tolist() == [True, False]


@pytest.fixture(scope="module")
def memorised(world):
  """A 2-layer model trained (200 full-batch adam steps) on the 24 QA pairs of all people."""
  model, params = make_model(world)
  qa = world.qa(np.arange(N_PEOPLE))
  batch = {k: jnp.asarray(v) for k, v in
           pipeline.pack_docs(qa.docs(np.arange(len(qa))), 128, world.pad_id).items()}
  loss_fn = step_lib.make_lm_loss(model)
  opt = optax.adam(3e-3)

  def train_step(params, opt_state):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, None, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_step = runs.optimized_jit(train_step)   # its time is its 200 steps
  opt_state = opt.init(params)
  for _ in range(200):
    params, opt_state, loss = train_step(params, opt_state)
  assert float(loss) < 0.02
  return model, params


def test_memorised_qa_scores_100(world, memorised):
  model, params = memorised
  correct, attrs, _ = qa_eval.qa_correct(model, params, world, np.arange(N_PEOPLE),
                                        batch_size=16)
  acc = qa_eval.per_attribute(correct, attrs)
  assert set(acc) == set(ATTRIBUTES) | {"mean"}
  assert acc["mean"] == 1.0, acc


def test_runs_decoded_together_answer_as_alone(world, memorised):
  """A grid's eval (qa_correct with runs=True): three runs' params stacked on a run axis and
  decoded in one vmapped pass give each run the answers it gives alone: a model that answers
  everything and stops early at EOT, a random one that never stops, and the memorised one with
  its embeddings perturbed (some right, some wrong), so the runs stop at different steps."""
  model, params = memorised
  _, random = make_model(world)
  noisy = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
      if "embed" in jax.tree_util.keystr(path) else x, params)
  runs = [params, random, noisy]
  people = np.arange(N_PEOPLE)
  stacked = loop.stack_runs(runs)
  together, attrs, _ = qa_eval.qa_correct(model, stacked, world, people, batch_size=64,
                                          runs=True)
  assert together.shape == (3, N_PEOPLE * len(ATTRIBUTES))
  for r, p in enumerate(runs):
    alone, attrs_alone, _ = qa_eval.qa_correct(model, p, world, people, batch_size=64)
    np.testing.assert_array_equal(together[r], alone)
    np.testing.assert_array_equal(attrs, attrs_alone)
  assert together[0].all() and not together[1].any() and 0 < together[2].mean() < 1, together
  # the tokens themselves, up to and including each row's first EOT (qa_correct's one batch)
  qs = qa_eval.qa_set(world, people)
  width, eot = qs.answers_NW.shape[1], world.renderer.eot_id
  ((_, _, qs),) = qa_eval.length_batches(qs, 64)
  got = qa_eval.answer(model, stacked, world, qs, width, runs=True)
  for r, p in enumerate(runs):
    want = qa_eval.answer(model, p, world, qs, width)
    for b in range(len(want)):
      stop = np.flatnonzero(want[b] == eot)
      upto = stop[0] + 1 if len(stop) else width
      np.testing.assert_array_equal(got[r, b, :upto], want[b, :upto])
  # a bidirectional model's mask filling (GBERT), two random inits
  bert = [make_model(world, causal=False, seed=s) for s in (0, 1)]
  got = qa_eval.answer(bert[0][0], loop.stack_runs([p for _, p in bert]), world, qs, width,
                       runs=True)
  for r, (m, p) in enumerate(bert):
    np.testing.assert_array_equal(got[r], qa_eval.answer(m, p, world, qs, width))


def test_recompute_baseline_stops_early_like_the_cache(world, memorised):
  """A model that answers every question and closes it with EOT: the no-cache baseline skips
  the steps after every row has ended and returns the cache path's tokens (EOT-filled)."""
  model, params = memorised
  qs = qa_eval.qa_set(world, np.arange(N_PEOPLE))
  eot, max_new = world.renderer.eot_id, qs.answers_NW.shape[1] + 3
  args = (model, params, jnp.asarray(qs.rest_NR), jnp.asarray(qs.rest_lens_N), max_new, eot,
          qs.prefixes())
  kv = np.asarray(generate.generate(*args))
  assert (kv[:, -3:] == eot).all()      # every row ended before the last steps
  np.testing.assert_array_equal(generate.generate_recompute(*args), kv)


def test_bio_recall_values(world, memorised):
  model, params = memorised
  rec = qa_eval.bio_recall(model, params, world, np.arange(N_PEOPLE), batch_size=3)
  assert set(rec) == set(ATTRIBUTES) | {"mean"}
  assert all(0.0 <= v <= 1.0 for v in rec.values())


def test_qa_loss_mask_is_answer_only(world):
  people = np.arange(N_PEOPLE)
  qa = world.qa(people)
  docs = qa.docs(np.arange(len(qa)))
  batch = pipeline.pack_docs(docs, 64, world.pad_id)
  prompts, plens, answers, alens, _ = qa_eval.qa_arrays(world, people)
  by_inputs = {tuple(docs.doc(i)["tokens"][:-1].tolist()): i for i in range(len(docs))}
  eot = world.renderer.eot_id
  seen = 0
  for r in range(len(batch["inputs"])):
    for s in set(batch["segment_ids"][r].tolist()) - {0}:
      sel = batch["segment_ids"][r] == s
      i = by_inputs[tuple(batch["inputs"][r][sel].tolist())]
      w, tgt = batch["weights"][r][sel], batch["targets"][r][sel]
      answer = answers[i, :alens[i]]
      # Loss on exactly the answer value tokens and the closing EOT (the last alen targets).
      np.testing.assert_array_equal(w, np.arange(len(w)) >= len(w) - alens[i])
      np.testing.assert_array_equal(tgt[w > 0], answer)
      assert answer[-1] == eot and eot not in answer[:-1]
      # The eval prompt is the training document's text before the answer, whitespace and all.
      np.testing.assert_array_equal(docs.doc(i)["tokens"][:plens[i]], prompts[i, :plens[i]])
      assert "Answer:" in world.renderer.decode(prompts[i, :plens[i]])
      assert "Answer" not in world.renderer.decode(answer)
      seen += 1
  assert seen == len(docs) == 6 * N_PEOPLE
  assert batch["weights"][batch["segment_ids"] == 0].sum() == 0


def test_bench_eval_contract(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  cmd = [runs.python(), "-m", "kstore_jax.bench", "eval", "--config=configs/base.py:tiny",
         "--config.data.n_people=20", "--config.model.num_layers=1", "--eval_people=4",
         "--eval_repeats=1"]
  r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stderr
  out = {m["name"]: m for m in map(json.loads, r.stdout.strip().splitlines()[-6:])}
  assert set(out) == {"kv_cache_eval_s", "recompute_eval_s", "kv_cache_speedup",
                      "recompute_fixed_width_eval_s", "kv_cache_speedup_vs_fixed_width",
                      "qa_eval_questions_per_s"}
  s, fixed = out["kv_cache_speedup"], out["kv_cache_speedup_vs_fixed_width"]
  assert s["identical"] is True and s["unit"] == "ratio" and s["value"] > 0
  assert fixed["identical"] is True and fixed["flops_ratio"] > s["flops_ratio"] > 1
  assert s["of_flops_ratio"] == pytest.approx(s["value"] / s["flops_ratio"], rel=0.02)
  assert s["questions"] == 24 and s["max_new"] >= 2 and s["params_from"] == "random_init"
  r = subprocess.run(cmd + [f"--workdir={tmp_path / 'none'}"], cwd=root, capture_output=True,
                     text=True, timeout=120, check=False)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_qa_correct_parts_equals_separate_passes(world, memorised):
  model, params = memorised
  test, train = np.array([3, 1]), np.array([0, 2])
  parts = qa_eval.qa_correct_parts(model, params, world, [test, train], batch_size=8)
  for people, got in zip((test, train), parts):
    for a, b in zip(got, qa_eval.qa_correct(model, params, world, people, batch_size=8)):
      np.testing.assert_array_equal(a, b)


def test_bidirectional_recall_masks_every_copy_of_the_value():
  """A bio whose birth city is also its company's city (0.4% of people): recalling either
  masks both, or the model copies the one left visible. Other values are masked alone."""
  #                  date      birth city       univ   major  company   company city
  tokens = np.array([[9, 1, 2, 9, 5, 6, 7, 9, 3, 9, 4, 9, 8, 9, 5, 6, 7, 9]])
  spans = np.array([[[1, 3], [4, 7], [8, 9], [10, 11], [12, 13], [14, 17]]])
  want = np.zeros((1, 6, tokens.shape[1]), bool)
  for a, (s, e) in enumerate(spans[0]):
    want[0, a, s:e] = True
  want[0, 1, 14:17] = want[0, 5, 4:7] = True
  np.testing.assert_array_equal(qa_eval.value_masks(tokens, spans), want)


def test_a_compile_weighs_more_where_decoding_is_faster():
  """QA eval's shapes: an accelerator's compile is worth more decoding than a CPU's (its
  decoding is faster), and a larger model's positions cost more, so fewer are worth one."""
  cpu = ModelConfig(vocab_size=512, num_layers=2, d_model=64, num_heads=4, d_ff=256)
  gpu = dataclasses.replace(cpu, platform="cuda")
  wide = dataclasses.replace(cpu, d_model=128, d_ff=512)
  assert qa_eval.positions_per_compile(gpu) > qa_eval.positions_per_compile(cpu)
  assert qa_eval.positions_per_compile(wide) < qa_eval.positions_per_compile(cpu)
