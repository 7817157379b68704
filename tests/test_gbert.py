"""GBERT (bidirectional, whole-word masked LM) and the Llama rows: masking statistics and
determinism, the causal switch, mask-filling QA exact match, probes, configs, end-to-end runs."""

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runs

from configs import base
from kstore_jax import configlib
from kstore_jax.data import masking, tokenizer as tokenizer_lib, world as world_lib
from kstore_jax.data.tokenizer import MASK
from kstore_jax.eval import qa_eval
from kstore_jax.model import probes
from kstore_jax.model.transformer import ModelConfig, Transformer, model_vocab



@pytest.fixture(scope="module")
def world():
  cfg = base.get_config("tiny")
  cfg.data.update(n_people=200, multi=5, permute=True)
  return world_lib.build_world(cfg, tokenizer_lib.train_tokenizer(8192))


@pytest.fixture(scope="module")
def spec(world):
  return masking.MlmSpec.from_config(base.get_config("tiny").data.mlm, world.renderer)


def words_of(renderer, tokens):
  """Independent word split: per whitespace-separated word of the decoded text (between the
  EOTs), the indices of the tokens that hold its characters."""
  owner, text = [], ""
  for i, t in enumerate(tokens[1:-1], 1):
    piece = renderer.decode([t])
    text += piece
    owner += [i] * len(piece)
  words, cur = [], set()
  for ch, i in zip(text, owner):
    if ch.isspace():
      if cur:
        words.append(sorted(cur))
      cur = set()
    else:
      cur.add(i)
  return words + ([sorted(cur)] if cur else [])


def test_whole_word_masking_statistics(world, spec):
  docs = world.bios().docs(np.arange(600))
  inputs, weights = masking.mask_docs(docs, spec, seed=7, chunk=3)
  r = world.renderer
  n_words = n_sel = 0
  kinds = {"mask": 0, "random": 0, "same": 0}
  for d in range(len(docs)):
    s, e = docs.offsets[d], docs.offsets[d + 1]
    tok, inp, sel = docs.tokens[s:e], inputs[s:e], weights[s:e] > 0
    assert not sel[0] and not sel[-1]                 # EOTs are never selected
    words = words_of(r, tok)
    n_words += len(words)
    covered = set()
    for w in words:
      picked = sel[w]
      assert picked.all() or not picked.any(), r.decode(tok[w])   # whole words only
      covered.update(w)
      if picked.all():
        n_sel += 1
        if (inp[w] == spec.mask_id).all():
          kinds["mask"] += 1
        elif (inp[w] == tok[w]).all():
          kinds["same"] += 1
        else:
          kinds["random"] += 1
          assert (inp[w] != spec.mask_id).all()
    assert set(np.flatnonzero(sel)) <= covered
    assert (inp[~sel] == tok[~sel]).all()             # unselected tokens are unchanged
  assert 0.14 < n_sel / n_words < 0.16, n_sel / n_words
  frac = {k: v / n_sel for k, v in kinds.items()}
  assert abs(frac["mask"] - 0.8) < 0.02 and abs(frac["random"] - 0.1) < 0.015, frac
  np.testing.assert_array_equal(docs.tokens, world.bios().docs(np.arange(600)).tokens)


def test_qa_answers_are_masked_in_full(world, spec):
  docs = world.qa(world.train_people).docs(np.arange(60))
  inputs, weights = masking.mask_docs(docs, spec, seed=0, chunk=0)
  np.testing.assert_array_equal(weights > 0, docs.loss)
  assert (inputs[docs.loss] == spec.mask_id).all()
  np.testing.assert_array_equal(inputs[~docs.loss], docs.tokens[~docs.loss])


def test_masking_is_deterministic(world):
  cfg = base.get_config("tiny")
  cfg.data.chunk_docs = 64
  a = world.chunks("pretrain_mixed", cfg.data, mlm=True)
  b = world.chunks("pretrain_mixed", cfg.data, mlm=True)
  for k, v in a[5].items():
    np.testing.assert_array_equal(v, b[5][k])
  assert not np.array_equal(a[5]["weights"], a[6]["weights"])
  assert (a[5]["inputs"] == world.renderer.token_id(MASK)).any()
  # masked-LM rows pair each input with the original token at the same position
  keep = a[5]["weights"] == 0
  np.testing.assert_array_equal(a[5]["inputs"][keep], a[5]["targets"][keep])
  causal = world.chunks("pretrain_mixed", cfg.data)[5]
  assert not (causal["inputs"] == world.renderer.token_id(MASK)).any()


def tiny_model(causal: bool, block: str = "gpt2"):
  cfg = ModelConfig(vocab_size=256, num_layers=2, num_heads=2, d_model=32, d_ff=64,
                    causal=causal, block=block)
  model = Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  return model, params["params"]


@pytest.mark.parametrize("block", ["gpt2", "llama"])
def test_causal_switch(block):
  tokens = jnp.arange(1, 11, dtype=jnp.int32)[None]
  changed = tokens.at[0, 7].set(200)
  for causal in (True, False):
    model, params = tiny_model(causal, block)
    out = lambda t: model.apply({"params": params}, t)[0][0]
    diff = jnp.abs(out(tokens) - out(changed)).max(-1)
    assert (diff[:7] > 1e-6).all() != causal, (causal, diff)
    assert (diff[7:] > 1e-6).all()


def prompt_key(tokens_BL, valid_BL, mask_id):
  """An int32 fingerprint of each row's unmasked tokens (numpy or jax arrays; wraps alike)."""
  xp = jnp if isinstance(tokens_BL, jax.Array) else np
  pos = xp.arange(tokens_BL.shape[1], dtype=xp.int32)[None]
  use = valid_BL & (tokens_BL != mask_id)
  return xp.where(use, (tokens_BL.astype(xp.int32) + 1) * (pos * 7919 + 1), 0).sum(
      1, dtype=xp.int32)


@dataclasses.dataclass(frozen=True)
class Oracle:
  """A stand-in model: where its input holds a mask token, predicts `params['want']` of the
  question whose unmasked tokens match the row (qa_correct reorders and re-pads questions),
  else 0."""
  cfg: ModelConfig
  mask_id: int

  def apply(self, variables, tokens_BL, positions_BL, segment_ids_BL):
    del positions_BL
    key_B = prompt_key(tokens_BL, segment_ids_BL > 0, self.mask_id)
    row_B = jnp.argmax(key_B[:, None] == variables["params"]["keys"][None], 1)
    want_BL = variables["params"]["want"][row_B, :tokens_BL.shape[1]]
    pred = jnp.where(tokens_BL == self.mask_id, want_BL, 0)
    return jax.nn.one_hot(pred, self.cfg.vocab_size) * 10.0, None, None


def test_gbert_exact_match_needs_every_answer_token(world):
  people = world.test_people[:8]
  prompts, plens, answers, alens, attrs = qa_eval.qa_arrays(world, people)
  want = np.zeros((len(prompts), prompts.shape[1] + answers.shape[1]), np.int32)
  for i in range(len(prompts)):
    want[i, plens[i]:plens[i] + alens[i]] = answers[i, :alens[i]]
  long = np.flatnonzero(alens >= 3)[:5]              # value of >= 2 tokens + EOT
  for i in long:
    want[i, plens[i] + alens[i] // 2] += 1           # one wrong middle token
  mask_id = world.renderer.token_id(MASK)
  keys = prompt_key(prompts, np.arange(prompts.shape[1])[None] < plens[:, None], mask_id)
  assert len(set(keys.tolist())) == len(keys)
  model = Oracle(ModelConfig(vocab_size=model_vocab(world.renderer), causal=False), mask_id)
  params = {"want": jnp.asarray(want), "keys": jnp.asarray(keys)}
  correct, got_attrs, got_alens = qa_eval.qa_correct(model, params, world, people, 16)
  expect = np.ones(len(prompts), bool)
  expect[long] = False
  np.testing.assert_array_equal(correct, expect)
  by = qa_eval.by_answer_tokens(correct, got_attrs, got_alens)
  assert by["all"]["single"] == 1.0 and by["all"]["multi"] < 1.0
  assert by["birth_date"]["multi_share"] == 1.0 and "single" not in by["birth_date"]


def test_bidirectional_probe_reads_only_up_to_its_position():
  model, params = tiny_model(False)
  probe = probes.init(jax.random.PRNGKey(1), 256, 32, 2, 2, [3, 4])
  tokens = jnp.arange(1, 13, dtype=jnp.int32)[None]
  batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
           "probe_at": jnp.array([[3, 6]], jnp.int32)}
  h = probes.probed_hidden(model, params, probe, batch)
  changed = {**batch, "tokens": tokens.at[0, 7:].set(100)}
  np.testing.assert_allclose(h, probes.probed_hidden(model, params, probe, changed), atol=1e-6)
  cut = {**batch, "tokens": tokens.at[0, 5].set(100)}     # before position 6, after 3
  diff = jnp.abs(h - probes.probed_hidden(model, params, probe, cut)).max(-1)[0]
  assert diff[0] < 1e-6 < diff[1]


@pytest.mark.parametrize("spec_", ["configs/gbert/single.py:tiny",
                                   "configs/gbert/single.py:tiny,mixed",
                                   "configs/gbert/multi5_permute.py:tiny,mixed",
                                   "configs/llama/single.py:tiny",
                                   "configs/llama/multi5_permute.py:tiny,mixed"])
def test_arch_configs(spec_):
  cfg = configlib.load_config_file(spec_)
  configlib.validate(cfg, 1)
  arch, row = spec_.split("/")[1], spec_.split("/")[2].split(".")[0]
  assert cfg.name == f"{arch}_{row}"
  assert cfg.model.causal == (arch != "gbert")
  assert cfg.model.block == ("llama" if arch == "llama" else "gpt2")
  assert ("pretrain_mixed" in cfg.stages) == spec_.endswith("mixed")


@pytest.mark.parametrize("key,value,message", [
    ("word_rate", 0.0, "data.mlm.word_rate=0.0 must be in (0, 1]"),
    ("random", 0.3, "data.mlm.mask + data.mlm.random = 1.1 must be <= 1")])
def test_mlm_config_errors(key, value, message):
  cfg = base.get_config("tiny")
  cfg.data.mlm[key] = value
  with pytest.raises(configlib.ConfigError, match=message.replace("+", r"\+").replace("(", r"\(")
                     .replace("]", r"\]")):
    configlib.validate(cfg, 1)


SMALL = ["--config.data.n_people=100", "--config.model.num_layers=1",
         "--config.model.d_model=64", "--config.model.d_ff=128", "--config.train.log_every=1",
         "--config.eval.batch_size=64", "--config.eval.max_people=10"] + [
    f"--config.{s}.{k}={v}" for s in ("pretrain", "pretrain_mixed", "finetune", "pprobe", "qprobe")
    for k, v in (("steps", 2), ("batch_size", 8), ("warmup_steps", 1))]


def run(config: str, workdir: pathlib.Path, cache) -> dict:
  out = runs.run_main([f"--config={config}", f"--workdir={workdir}", *SMALL], cache)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads((workdir / "results.json").read_text())


def test_gbert_run_with_probes(tmp_path, jax_cache):
  results = run("configs/gbert/single.py:tiny,probe", tmp_path, jax_cache)
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["model"]["causal"] is False and cfg["name"] == "gbert_single"
  assert results["evaluated_stage"] == "finetune"
  for key in ("qa_test", "qa_train", "bio_recall", "qprobe"):
    assert 0.0 <= results[key]["mean"] <= 1.0
  assert np.asarray(results["pprobe"]).shape == (6, 6)
  assert results["qa_test_by_tokens"]["all"]["multi_share"] > 0


def test_llama_mixed_run(tmp_path, jax_cache):
  results = run("configs/llama/multi5_permute.py:tiny,mixed", tmp_path, jax_cache)
  assert results["evaluated_stage"] == "pretrain_mixed"
  assert 0.0 <= results["qa_test"]["mean"] <= 1.0
  assert (tmp_path / "pretrain_mixed" / "final").is_dir()


def test_report_arch_and_token_tables(tmp_path):
  from kstore_jax.tools import report
  by_tokens = {"company": {"single": 0.5, "multi": 0.25, "multi_share": 0.6},
               "all": {"single": 0.5, "multi": 0.2, "multi_share": 0.9}}
  runs = []
  for name, model, stages, acc in (
      ("single", {"causal": True, "block": "gpt2"}, ["pretrain", "finetune", "eval"], 0.1),
      ("gbert_single", {"causal": False, "block": "gpt2"}, ["pretrain_mixed", "eval"], 0.3),
      ("llama_single", {"causal": True, "block": "llama"}, ["pretrain", "finetune", "eval"], 0.2)):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"name": name, "model": model, "stages": stages}))
    res = {k: {"mean": acc} for k in ("qa_test", "qa_train", "bio_recall")}
    (d / "results.json").write_text(json.dumps({**res, "qa_test_by_tokens": by_tokens}))
    runs.append(str(d))
  text, _ = report.build_report(runs, str(tmp_path / "report.md"))
  assert ("| `single` | 10.0 (9.7) | — (86.6) | — (~4) | 30.0 (~30) | 20.0 (—) | — (—) |"
          in text)
  assert ("| `gbert_single` | gbert | mixed | — | — | — | — | 50.0 / 25.0 (60% multi) | — | "
          "50.0 / 20.0 (90% multi) |" in text)
  # two runs of one config (different overrides) are told apart by their directories
  twin = tmp_path / "llama_single_wide"
  twin.mkdir()
  (twin / "config.json").write_text((tmp_path / "llama_single" / "config.json").read_text())
  (twin / "results.json").write_text((tmp_path / "llama_single" / "results.json").read_text())
  text, _ = report.build_report([runs[2], str(twin)], str(tmp_path / "twins.md"))
  assert "| `llama_single` (llama_single) | llama |" in text
  assert "| `llama_single` (llama_single_wide) | llama |" in text


def test_llama_rotates_the_fraction_it_is_given():
  """Llama's configs rotate whole heads (ARCHS: rotary_fraction 1); an override of the
  fraction is the model's, not silently replaced by 1."""
  from kstore_jax.model.transformer import ModelConfig
  cfg = configlib.load_config_file("configs/llama/single.py:tiny")
  assert cfg.model.rotary_fraction == 1.0
  head = cfg.model.d_model // cfg.model.num_heads
  for frac in (1.0, 0.5):
    got = ModelConfig(vocab_size=64, block="llama", d_model=cfg.model.d_model,
                      num_heads=cfg.model.num_heads, rotary_fraction=frac).rotary_dim
    assert got == int(head * frac)
