"""P-probing and Q-probing heads as pure functions over a probe param pytree.

The frozen base model reads the input through its embedding plus a low-rank update
`embed_a @ embed_b` (rank 2 for P-probes, 16 for Q-probes; `embed_b` starts at zero, so training
starts from the frozen model). At each probed position the final hidden state goes through a
LayerNorm and one classifier per (position, attribute). Only the probe params train: the base
params enter through `jax.lax.stop_gradient`.

Two classifier heads (`<stage>.head`):
- `linear` (the paper's): a weight vector and a bias per class, [D, C] per (position, attribute).
- `embedding`: the same linear read-out with its [D, C] weights factored as M K^T: K [C, D]
  holds the frozen model's input embedding of each class's value text (the mean over its
  tokens, unit length), M [D, D] is learned (one per (position, attribute)); no bias. Every
  class then gets its weights from what the probe learns about all of them; the linear head
  must learn each class's weights from that class's own examples, which a few hundred
  probe-training people do not give 200-300-class attributes (one or two examples per class
  at the tiny scale; RESULTS.md, "Probes").

Class sets, labels and class value texts: data/classes.py (birth date = the birth month, 12
classes; company city = the HQ cities).
"""

import jax
import jax.numpy as jnp

from kstore_jax.data.batches import LABELS, PROBE_AT, ROW_WEIGHTS, SEGMENT_IDS, TOKENS

HEADS = ("linear", "embedding")


def class_vectors(base, tokens) -> list[jax.Array]:
  """Per attribute [C, D]: the unit-length mean of the frozen input embedding over each class's
  value tokens (`classes.class_tokens`)."""
  table_VD = jax.lax.stop_gradient(base["embed"]["embedding"]).astype(jnp.float32)
  out = []
  for ids_CW, real_CW in tokens:
    mean_CD = (table_VD[ids_CW] * real_CW[..., None]).sum(1) / real_CW.sum(1, keepdims=True)
    out.append(mean_CD / jnp.linalg.norm(mean_CD, axis=-1, keepdims=True))
  return out


def init(rng, vocab: int, d_model: int, embed_rank: int, n_positions: int, classes: list[int],
         head: str = "linear"):
  k_embed, *k_heads = jax.random.split(rng, 1 + len(classes))
  if head == "linear":
    heads = [{"w": jax.random.normal(k, (n_positions, d_model, c), jnp.float32)
                   / jnp.sqrt(d_model),
              "b": jnp.zeros((n_positions, c), jnp.float32)} for k, c in zip(k_heads, classes)]
  elif head == "embedding":   # class vectors have unit length: logits start at ~unit scale
    heads = [{"m": jax.random.normal(k, (n_positions, d_model, d_model), jnp.float32)
                   / jnp.sqrt(d_model)} for k in k_heads]
  else:
    raise ValueError(f"probe head {head!r}: expected one of {HEADS}")
  return {
      "embed_a": jax.random.normal(k_embed, (vocab, embed_rank), jnp.float32),
      "embed_b": jnp.zeros((embed_rank, d_model), jnp.float32),
      "ln": {"scale": jnp.ones((d_model,), jnp.float32), "bias": jnp.zeros((d_model,), jnp.float32)},
      "heads": heads,
  }


def _layer_norm(x, ln):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * ln["scale"] + ln["bias"]


def probe_apply(probe, hidden_BJD, classes_CD=None):
  """Per attribute logits [B, J, C_a] from the hidden states at the J probed positions;
  `classes_CD` (`class_vectors`, per attribute) for the embedding head."""
  h = _layer_norm(hidden_BJD.astype(jnp.float32), probe["ln"])
  return [jnp.einsum("bje,ce->bjc", jnp.einsum("bjd,jde->bje", h, head["m"]), classes_CD[a])
          if "m" in head else jnp.einsum("bjd,jdc->bjc", h, head["w"]) + head["b"]
          for a, head in enumerate(probe["heads"])]


def probe_logits(model, base, probe, batch, tokens=None):
  """Per attribute logits [B, J, C_a] of a batch; `tokens` = `classes.class_tokens` for the
  embedding head."""
  classes = class_vectors(base, tokens) if tokens is not None else None
  return probe_apply(probe, probed_hidden(model, base, probe, batch), classes)


def probed_hidden(model, base, probe, batch):
  """Final hidden states [B, J, D] at the probe batch's PROBE_AT (data/batches.py) with the
  embedding update applied.

  Each probed position sees the input up to and including itself: one pass for a causal model;
  a bidirectional one (GBERT) would otherwise see the value it is probed for, so it gets one
  pass per probed position with the input cut right after it (Q-probes: the name, uncut)."""
  base = jax.lax.stop_gradient(base)
  delta_VD = probe["embed_a"] @ probe["embed_b"]
  tokens, at_BJ = batch[TOKENS], batch[PROBE_AT]
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

  def hidden(segment_ids_BL):
    return model.apply({"params": base}, tokens, positions, segment_ids_BL,
                       embed_delta_VD=delta_VD)[1]

  if model.cfg.causal:
    return jnp.take_along_axis(hidden(batch[SEGMENT_IDS]), at_BJ[..., None], axis=1)
  rows = jnp.arange(tokens.shape[0])
  cut = lambda p: batch[SEGMENT_IDS] * (positions <= at_BJ[:, p:p + 1])
  return jnp.stack([hidden(cut(p))[rows, at_BJ[:, p]] for p in range(at_BJ.shape[1])], 1)


def _row_mean(x_BJ, weights_B):
  """[J]: the mean over the batch's weighted rows (padding rows have weight 0)."""
  return jnp.einsum("bj,b->j", x_BJ.astype(jnp.float32), weights_B) / weights_B.sum()


def make_probe_loss(model, tokens=None):
  """Mean cross entropy over the batch's examples, positions and attributes (padding rows
  count nowhere: batches.py ROW_WEIGHTS); aux: accuracy. `tokens`: `classes.class_tokens` for
  the embedding head."""

  def loss_fn(probe, base, batch):
    logits = probe_logits(model, base, probe, batch, tokens)
    labels, weights_B = batch[LABELS], batch[ROW_WEIGHTS]       # [B, 6], [B]
    ce, acc = [], []
    for a, lg in enumerate(logits):
      y_BJ = jnp.broadcast_to(labels[:, None, a], lg.shape[:2])
      logp = jax.nn.log_softmax(lg)
      ce.append(_row_mean(-jnp.take_along_axis(logp, y_BJ[..., None], -1)[..., 0], weights_B))
      acc.append(_row_mean(lg.argmax(-1) == y_BJ, weights_B))
    return jnp.mean(jnp.stack(ce)), {"probe_acc": jnp.mean(jnp.stack(acc))}

  return loss_fn


def accuracy_matrix(model, base, probe, batch, tokens=None) -> jax.Array:
  """[J, 6] accuracy of each (position, attribute) classifier over a batch's examples."""
  logits = probe_logits(model, base, probe, batch, tokens)
  return jnp.stack([_row_mean(lg.argmax(-1) == batch[LABELS][:, None, a], batch[ROW_WEIGHTS])
                    for a, lg in enumerate(logits)], -1)
