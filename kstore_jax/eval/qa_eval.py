"""Exact-match QA accuracy (KV-cache greedy generation) and the bio-recall storage check."""

import jax
import jax.numpy as jnp
import numpy as np

from kstore_jax.data.render import N_ATTR, QA_VALUE_SLOTS
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.eval.generate import generate


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


def evaluate_qa(model, params, world, people, batch_size: int = 512, progress=None):
  """Per-attribute exact-match accuracy of greedy answers for `people`, plus 'mean'."""
  prompts, plens, answers, alens, attrs = qa_arrays(world, people)
  batch_size = min(batch_size, len(prompts))
  max_new = answers.shape[1]
  correct = np.zeros(len(prompts), bool)
  for idx, n in _batches(len(prompts), batch_size):
    gen = np.asarray(generate(model, params, jnp.asarray(prompts[idx]), jnp.asarray(plens[idx]),
                              max_new))
    correct[idx[:n]] = answers_match(gen, answers[idx], alens[idx])[:n]
    if progress:
      progress(n)
  return per_attribute(correct, attrs)


def bio_recall(model, params, world, people, batch_size: int = 256):
  """Teacher-forced exact match of each attribute value inside each person's first bio."""
  bios = world.bios(people)
  idx_all = np.arange(len(people)) * world.aug.copies
  tokens, lens = bios.docs(idx_all).padded(world.pad_id)
  spans = bios.spans(idx_all)
  batch_size = min(batch_size, len(tokens))

  @jax.jit
  def predict(tokens_BL, lens_B):
    positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    seg = (positions < lens_B[:, None]).astype(jnp.int32)
    logits, _, _ = model.apply({"params": params}, tokens_BL, positions, seg)
    return jnp.argmax(logits, -1)

  correct = np.zeros((len(tokens), N_ATTR), bool)
  for idx, n in _batches(len(tokens), batch_size):
    pred = np.asarray(predict(jnp.asarray(tokens[idx]), jnp.asarray(lens[idx])))
    for j in range(n):
      row = idx[j]
      for a, (s, e) in enumerate(spans[row]):
        correct[row, a] = (pred[j, s - 1:e - 1] == tokens[row, s:e]).all()
  attrs = np.broadcast_to(np.arange(N_ATTR), correct.shape)
  return per_attribute(correct.ravel(), attrs.ravel())
