"""Grain random-access sources of generated documents (bios, QA), each with a vectorised
`docs()` (imported bios: data/imported.py's StoredBios, the same interface).

They follow `grain.sources.RandomAccessDataSource` (`__len__`, `__getitem__`), so they can be
used with any Grain pipeline; the packing pipeline (pipeline.py) calls `docs(indices)` to render
many documents in one NumPy pass.
"""

import numpy as np

from kstore_jax.data.population import Population
from kstore_jax.data.render import N_ATTR, AugSpec, Docs, Renderer


class BioSource:
  """Bios of `people`, `aug.copies` per person: index i -> (people[i // copies], i % copies)."""

  def __init__(self, renderer: Renderer, pop: Population, people: np.ndarray, aug: AugSpec,
               seed: int):
    self.renderer, self.pop, self.aug, self.seed = renderer, pop, aug, seed
    self.people = np.asarray(people, np.int64)

  def __len__(self) -> int:
    return len(self.people) * self.aug.copies

  def __repr__(self) -> str:
    return f"BioSource(people={len(self.people)}, {self.aug})"

  def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """Bio indices -> (person ids, copy indices)."""
    q, copy = np.divmod(np.asarray(indices, np.int64), self.aug.copies)
    return self.people[q], copy

  def pieces(self, indices) -> tuple[np.ndarray, np.ndarray]:
    people, copies = self.locate(indices)
    return self.renderer.bio_pieces(self.pop, people, copies, self.aug, self.seed)

  def docs(self, indices) -> Docs:
    pieces, _ = self.pieces(indices)
    return self.renderer.render(pieces, self.renderer.bio_loss_pieces())

  def spans(self, indices) -> np.ndarray:
    """[n, 6, 2] token spans of each attribute value (doc coordinates, BOS at 0)."""
    return self.renderer.value_spans(*self.pieces(indices))

  def lengths(self, indices) -> np.ndarray:
    """Token counts of the documents (sums of piece lengths: nothing rendered)."""
    return self.renderer.piece_len[self.pieces(indices)[0]].sum(1)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    person, copy = self.locate([index])
    return {**self.docs([index]).doc(0), "spans": self.spans([index])[0],
            "person": person[0], "copy": copy[0]}


class QASource:
  """Six question-answer pairs per person of `people`: index i -> (people[i // 6], attr i % 6)."""

  def __init__(self, renderer: Renderer, pop: Population, people: np.ndarray,
               attributes=tuple(range(N_ATTR))):
    self.renderer, self.pop = renderer, pop
    self.people = np.asarray(people, np.int64)
    self.attributes = np.asarray(attributes, np.int64)

  def __len__(self) -> int:
    return len(self.people) * len(self.attributes)

  def __repr__(self) -> str:
    return f"QASource(people={len(self.people)}, attributes={len(self.attributes)})"

  def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
    q, a = np.divmod(np.asarray(indices, np.int64), len(self.attributes))
    return self.people[q], self.attributes[a]

  def pieces(self, indices) -> np.ndarray:
    return self.renderer.qa_pieces(self.pop, *self.locate(indices))

  def docs(self, indices) -> Docs:
    return self.renderer.render(self.pieces(indices), self.renderer.qa_loss_pieces())

  def lengths(self, indices) -> np.ndarray:
    """Token counts of the documents (sums of piece lengths: nothing rendered)."""
    return self.renderer.piece_len[self.pieces(indices)].sum(1)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    person, attr = self.locate([index])
    return {**self.docs([index]).doc(0), "person": person[0], "attribute": attr[0]}

