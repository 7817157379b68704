"""Everything data a run needs, built once from the config: population, renderer, sources."""

import dataclasses

import numpy as np
import tokenizers

from kstore_jax.data import pipeline, population, render, sources
from kstore_jax.data.tokenizer import PAD


@dataclasses.dataclass
class World:
  seed: int
  pop: population.Population
  renderer: render.Renderer
  aug: render.AugSpec
  qa_train: np.ndarray     # bool [n_people]: QA of these people is training data

  @property
  def train_people(self) -> np.ndarray:
    return np.flatnonzero(self.qa_train)

  @property
  def test_people(self) -> np.ndarray:
    return np.flatnonzero(~self.qa_train)

  @property
  def pad_id(self) -> int:
    return self.renderer.token_id(PAD)

  def bios(self, people=None) -> sources.BioSource:
    people = np.arange(len(self.pop)) if people is None else people
    return sources.BioSource(self.renderer, self.pop, people, self.aug, self.seed)

  def qa(self, people) -> sources.QASource:
    return sources.QASource(self.renderer, self.pop, people)

  def stage_mixture(self, stage: str, data_cfg) -> tuple[list, list]:
    """(sources, weights) of a training stage's document stream."""
    if stage == "pretrain":
      return [self.bios()], [1.0]
    if stage == "pretrain_mixed":
      r = data_cfg.qa_ratio
      return [self.bios(), self.qa(self.train_people)], [1.0 - r, r]
    if stage == "finetune":
      return [self.qa(self.train_people)], [1.0]
    raise ValueError(f"stage {stage!r} has no document stream")

  def max_doc_positions(self, block: int = 1 << 20) -> int:
    """The longest bio or QA of this population, in positions (tokens - 1).

    Lengths are sums of piece lengths, so this needs no rendering: a pass over all documents'
    piece ids, `block` at a time.
    """
    longest = 0
    for src in (self.bios(), self.qa(np.arange(len(self.pop)))):
      for s in range(0, len(src), block):
        pieces = src.pieces(np.arange(s, min(s + block, len(src))))
        pieces = pieces[0] if isinstance(pieces, tuple) else pieces
        longest = max(longest, int(self.renderer.piece_len[pieces].sum(1).max()))
    return longest - 1

  def chunks(self, stage: str, data_cfg, seed_offset: int = 0) -> pipeline.PackedChunks:
    srcs, weights = self.stage_mixture(stage, data_cfg)
    return pipeline.PackedChunks(srcs, weights, data_cfg.seq_len, self.pad_id,
                                 seed=self.seed * 1000 + seed_offset, chunk_docs=data_cfg.chunk_docs)


def build_world(cfg, tokenizer: tokenizers.Tokenizer) -> World:
  data = cfg.data
  return World(seed=cfg.seed, pop=population.make_population(cfg.seed, data.n_people),
               renderer=render.Renderer(tokenizer), aug=render.AugSpec.from_config(data),
               qa_train=render.qa_split(cfg.seed, data.n_people, data.qa_train_fraction))
