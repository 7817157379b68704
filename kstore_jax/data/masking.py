"""Whole-word masked-LM documents for the bidirectional model (GBERT): a pure function of
(stage seed, chunk index), applied to a chunk's documents before packing.

A word is all tokens of one whitespace-separated word: a token starts a word when its text
starts with whitespace (byte-level BPE keeps a word's leading space on its first token), when the
previous token's text ends with whitespace ("\\n" before "Answer"), or when it or the previous
token is a special token (EOT). Special tokens are never masked as words.

Which tokens are selected depends on the document's loss mask (render.Docs.loss):
- free text (bios: every token after the leading EOT is a target): `word_rate` of its words,
  rounded, at least one, chosen uniformly; each selected word becomes mask tokens (`mask`),
  random tokens (`random`) or stays unchanged (the rest), the same choice for all its tokens;
- a QA pair (the targets are the answer value and its EOT): the whole answer becomes mask
  tokens, the form the model is evaluated in (eval/generate.fill_masks).
Targets are the original tokens at the same positions; the loss is on selected tokens only.
Every draw is `hashing.hash_keys(seed, purpose, chunk, index)`.
"""

import dataclasses

import numpy as np

from kstore_jax.data import hashing
from kstore_jax.data.render import Docs
from kstore_jax.data.tokenizer import MASK, SPECIAL_TOKENS

_H_SELECT, _H_KIND, _H_RANDOM = 0x4D4C4D01, 0x4D4C4D02, 0x4D4C4D03


@dataclasses.dataclass(frozen=True, eq=False)
class MlmSpec:
  """The masking rates and the per-model-id tables masking needs (all [model vocab] arrays)."""
  word_rate: float          # fraction of a free-text document's words selected
  mask: float               # of the selected words: replaced by mask tokens
  random: float             # ... by random tokens; the rest stay unchanged
  mask_id: int
  starts_space: np.ndarray  # bool: the token's text starts with whitespace
  ends_space: np.ndarray    # bool: the token's text ends with whitespace
  special: np.ndarray       # bool: EOT, PAD, MASK
  random_ids: np.ndarray    # int32: the ids a random replacement draws from (non-special)

  @classmethod
  def from_config(cls, mlm_cfg, renderer) -> "MlmSpec":
    texts = [renderer.decode([i]) for i in range(renderer.vocab_size)]
    special = np.isin(np.arange(renderer.vocab_size),
                      [renderer.token_id(t) for t in SPECIAL_TOKENS])
    return cls(word_rate=mlm_cfg.word_rate, mask=mlm_cfg.mask, random=mlm_cfg.random,
               mask_id=renderer.token_id(MASK),
               starts_space=np.array([t[:1].isspace() for t in texts]),
               ends_space=np.array([t[-1:].isspace() for t in texts]), special=special,
               random_ids=np.flatnonzero(~special).astype(np.int32))


def _uniform(*keys) -> np.ndarray:
  """Hash keys to floats in [0, 1)."""
  return (hashing.hash_keys(*keys) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def word_starts(docs: Docs, spec: MlmSpec) -> np.ndarray:
  """bool [tokens]: the token starts a word (a document's first token always does)."""
  tok = docs.tokens
  after = np.ones(len(tok), bool)
  after[1:] = spec.ends_space[tok[:-1]] | spec.special[tok[:-1]]
  after[docs.offsets[:-1]] = True
  return after | spec.starts_space[tok] | spec.special[tok]


def mask_docs(docs: Docs, spec: MlmSpec, seed: int, chunk: int):
  """(inputs [tokens] int32, weights [tokens] float32): the masked documents and the loss."""
  tok, loss, lens = docs.tokens, docs.loss.astype(bool), docs.lengths
  doc = np.repeat(np.arange(len(docs)), lens)
  # a QA pair: its targets are the answer only, not every token after the leading EOT
  answer_doc = np.add.reduceat(loss.astype(np.int64), docs.offsets[:-1]) < lens - 1
  start = word_starts(docs, spec)
  word = np.cumsum(start) - 1                                       # word id per token
  first = np.flatnonzero(start)                                     # first token per word
  maskable = loss & ~spec.special[tok] & ~answer_doc[doc]
  ok = np.logical_and.reduceat(maskable, first)                     # [words]
  cand = np.flatnonzero(ok)
  cand_doc = doc[first[cand]]
  n_words = np.bincount(cand_doc, minlength=len(docs))
  quota = np.where(n_words > 0, np.maximum(1, np.floor(spec.word_rate * n_words + 0.5)), 0)
  by_doc = np.lexsort((_uniform(seed, _H_SELECT, chunk, cand), cand_doc))
  rank = np.empty(len(cand), np.int64)
  rank[by_doc] = np.arange(len(cand)) - np.searchsorted(cand_doc[by_doc], cand_doc[by_doc])
  chosen = np.zeros(len(first), bool)
  chosen[cand[rank < quota[cand_doc]]] = True
  kind = _uniform(seed, _H_KIND, chunk, np.arange(len(first)))      # per word
  selected = chosen[word] | (loss & answer_doc[doc])
  to_mask = selected & ((kind[word] < spec.mask) | answer_doc[doc])
  to_random = selected & ~to_mask & (kind[word] < spec.mask + spec.random)
  inputs = tok.astype(np.int32)
  inputs[to_mask] = spec.mask_id
  pick = hashing.uniform_int(len(spec.random_ids), seed, _H_RANDOM, chunk,
                             np.flatnonzero(to_random))
  inputs[to_random] = spec.random_ids[pick]
  return inputs, selected.astype(np.float32)
