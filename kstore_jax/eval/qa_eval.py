"""Exact-match QA accuracy (KV-cache greedy generation; mask filling for a bidirectional model)
and the bio-recall storage check."""

import jax
import jax.numpy as jnp
import numpy as np

from kstore_jax.data.render import N_ATTR, QA_VALUE_SLOTS
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.data.tokenizer import MASK
from kstore_jax.data.world import group_index
from kstore_jax.eval.generate import fill_masks, generate, greedy


def qa_arrays(world, people):
  """Prompts [n, P], prompt lengths, answers [n, A] (value + EOT), answer lengths, attributes."""
  qa = world.qa(people)
  pieces = qa.pieces(np.arange(len(qa)))
  r = world.renderer
  no_loss = np.zeros(pieces.shape[1], bool)
  prompts, plens = r.render(pieces[:, :QA_VALUE_SLOTS.start], no_loss[:6]).padded(world.pad_id)
  answers, alens = r.render(pieces[:, QA_VALUE_SLOTS], no_loss[:5]).padded(world.pad_id)
  _, attrs = qa.locate(np.arange(len(qa)))
  return prompts, plens, answers, alens, attrs


def _batches(n: int, batch_size: int):
  """Fixed-size index batches (the last one padded by repeating index 0) and their counts."""
  for s in range(0, n, batch_size):
    idx = np.arange(s, min(s + batch_size, n))
    yield np.concatenate([idx, np.zeros(batch_size - len(idx), np.int64)]), len(idx)


def per_attribute(correct: np.ndarray, attrs: np.ndarray) -> dict[str, float]:
  out = {a: float(correct[attrs == i].mean()) for i, a in enumerate(ATTRIBUTES)
         if (attrs == i).any()}
  out["mean"] = float(np.mean(list(out.values()))) if out else 0.0
  return out


def answers_match(generated_BA: np.ndarray, answers_BA: np.ndarray, alens_B: np.ndarray):
  """Exact match of every answer token, the closing EOT included."""
  width = answers_BA.shape[1]
  valid = np.arange(width)[None] < alens_B[:, None]
  return ((generated_BA[:, :width] == answers_BA) | ~valid).all(1)


def answer(model, params, world, prompts_BP, plens_B, alens_B, max_new: int) -> np.ndarray:
  """The model's answer tokens [B, max_new]: greedy decoding for a causal model; for a
  bidirectional one (GBERT) the prompt + alens_B[b] mask tokens (the true answer's length, EOT
  included), predicted at once."""
  args = (model, params, jnp.asarray(prompts_BP), jnp.asarray(plens_B))
  if model.cfg.causal:
    return np.asarray(generate(*args, max_new))
  return np.asarray(fill_masks(*args, jnp.asarray(alens_B), world.renderer.token_id(MASK),
                               max_new))


def qa_correct(model, params, world, people, batch_size: int = 512, progress=None):
  """(correct [n] bool, attributes [n], answer lengths [n] incl. EOT) for `people`'s QA."""
  prompts, plens, answers, alens, attrs = qa_arrays(world, people)
  batch_size = min(batch_size, len(prompts))
  correct = np.zeros(len(prompts), bool)
  for idx, n in _batches(len(prompts), batch_size):
    got = answer(model, params, world, prompts[idx], plens[idx], alens[idx], answers.shape[1])
    correct[idx[:n]] = answers_match(got, answers[idx], alens[idx])[:n]
    if progress:
      progress(n)
  return correct, attrs, alens


def by_group(groups, people, correct: np.ndarray, attrs: np.ndarray) -> dict[str, dict]:
  """per_attribute of each group's share of the QA of `people` (qa_correct's order: N_ATTR
  answers per person, person-major); groups with none of these people are left out."""
  group = group_index(groups, np.repeat(np.asarray(people, np.int64), N_ATTR))
  out = {}
  for k, g in enumerate(groups):
    sel = group == k
    if sel.any():
      out[g.name] = per_attribute(correct[sel], attrs[sel])
  return out


def evaluate_qa(model, params, world, people, batch_size: int = 512, progress=None):
  """Per-attribute exact-match accuracy of the answers for `people`, plus 'mean'."""
  correct, attrs, _ = qa_correct(model, params, world, people, batch_size, progress)
  return per_attribute(correct, attrs)


def by_answer_tokens(correct: np.ndarray, attrs: np.ndarray, alens: np.ndarray) -> dict:
  """Accuracy of single-token vs multi-token answer values (EOT not counted), per attribute
  ({'single': acc, 'multi': acc, 'multi_share': fraction of multi-token answers}; a kind with
  no answers is left out) and over all attributes."""
  multi = alens - 1 > 1

  def split(sel):
    out = {k: float(correct[sel & m].mean()) for k, m in (("single", ~multi), ("multi", multi))
           if (sel & m).any()}
    return {**out, "multi_share": float(multi[sel].mean())}

  return {**{a: split(attrs == i) for i, a in enumerate(ATTRIBUTES) if (attrs == i).any()},
          "all": split(np.ones_like(multi))}


def bio_recall(model, params, world, people, batch_size: int = 256):
  """Exact match of each attribute value inside each person's first bio: teacher-forced for a
  causal model; for a bidirectional one each value is masked in turn (the other five stay
  visible) and predicted in one pass."""
  r = world.renderer
  pieces, order = world.bio_pieces(people, np.zeros(len(people), np.int64))   # copy 0
  tokens, lens = r.render(pieces, r.bio_loss_pieces()).padded(world.pad_id)
  spans = r.value_spans(pieces, order)
  causal = model.cfg.causal
  variants = 1 if causal else N_ATTR      # bidirectional: one input per masked attribute
  batch_size = max(1, min(batch_size // variants, len(tokens)))

  @jax.jit
  def predict(tokens_BL, lens_B):
    positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    seg = (positions < lens_B[:, None]).astype(jnp.int32)
    logits, _, _ = model.apply({"params": params}, tokens_BL, positions, seg)
    return greedy(logits)

  cols = np.arange(tokens.shape[1])
  correct = np.zeros((len(tokens), N_ATTR), bool)
  for idx, n in _batches(len(tokens), batch_size):
    toks = np.repeat(tokens[idx][:, None], variants, 1)                # [B, variants, L]
    if not causal:
      s, e = spans[idx][..., :1], spans[idx][..., 1:]                  # [B, 6, 1]
      toks[(cols >= s) & (cols < e)] = r.token_id(MASK)
    pred = np.asarray(predict(jnp.asarray(toks.reshape(-1, toks.shape[-1])),
                              jnp.asarray(np.repeat(lens[idx], variants))))
    pred = pred.reshape(toks.shape)
    shift = 1 if causal else 0                # causal: the value at s..e is predicted at s-1..e-1
    for j in range(n):
      row = idx[j]
      for a, (s, e) in enumerate(spans[row]):
        correct[row, a] = (pred[j, 0 if causal else a, s - shift:e - shift]
                           == tokens[row, s:e]).all()
  attrs = np.broadcast_to(np.arange(N_ATTR), correct.shape)
  return per_attribute(correct.ravel(), attrs.ravel())
