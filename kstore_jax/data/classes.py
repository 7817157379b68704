"""Class facts of the six attributes of a world's people (`pop`: a generated Population or an
imported Roster, whose `value_counts()` says how many values each attribute has): the classes a
probe predicts (`n_classes`: birth date as the birth month, 12 classes; company city as the HQ
city, or the imported company_city values), each person's class ids (`probe_labels`) and each
class's value text as bios render it (`class_tokens`, the embedding probe head's class
vectors)."""

import numpy as np

from kstore_jax.data.population import MONTHS
from kstore_jax.data.templates import ATTRIBUTES


def n_classes(pop) -> list[int]:
  """Classes of each probed attribute, in ATTRIBUTES order (birth date: the month)."""
  counts = pop.value_counts()
  return [len(MONTHS)] + [counts[a] for a in ATTRIBUTES[1:]]


def probe_labels(pop, people) -> np.ndarray:
  """[n, 6] class ids of the probed attributes."""
  cols = [pop.birth_month] + [pop.attribute(a) for a in ATTRIBUTES[1:]]
  return np.stack([np.asarray(c)[people].astype(np.int32) for c in cols], -1)


def class_tokens(renderer, pop) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per attribute (model ids [C, W], 1 where a token is real [C, W]) of each class's value text
  as bios render it (birth date: the month; company city: the HQ city)."""
  firsts = [renderer.month0] + [renderer.value0[a] for a in ATTRIBUTES[1:]]
  out = []
  for first, c in zip(firsts, n_classes(pop)):
    ids_CW, lens_C = renderer.render((first + np.arange(c))[:, None], np.zeros(1, bool)).padded(0)
    out.append((ids_CW, (np.arange(ids_CW.shape[1]) < lens_C[:, None]).astype(np.float32)))
  return out
