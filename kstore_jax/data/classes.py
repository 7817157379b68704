"""Class facts of the six attributes: how many values each has (`value_counts`), the classes a
probe predicts (`n_classes`: birth date as the birth month, 12 classes; company city as the HQ
city), each person's class ids (`probe_labels`) and each class's value text as bios render it
(`class_tokens`, the embedding probe head's class vectors)."""

import numpy as np

from kstore_jax.data import pools as pools_lib
from kstore_jax.data.population import MONTHS, N_DAYS, N_YEARS
from kstore_jax.data.templates import ATTRIBUTES


def value_counts() -> dict[str, int]:
  """Number of possible values (classes) of each attribute (birth date: every date)."""
  p = pools_lib.load_pools()
  return {"birth_date": N_YEARS * len(MONTHS) * N_DAYS, "birth_city": len(p.birth_cities),
          "university": len(p.universities), "major": len(p.majors),
          "company": len(p.companies), "company_city": len(p.hq_cities)}


def n_classes() -> list[int]:
  """Classes of each probed attribute, in ATTRIBUTES order (birth date: the month)."""
  counts = value_counts()
  return [len(MONTHS)] + [counts[a] for a in ATTRIBUTES[1:]]


def probe_labels(pop, people) -> np.ndarray:
  """[n, 6] class ids of the probed attributes."""
  cols = [pop.birth_month] + [pop.attribute(a) for a in ATTRIBUTES[1:]]
  return np.stack([np.asarray(c)[people].astype(np.int32) for c in cols], -1)


def class_tokens(renderer) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per attribute (model ids [C, W], 1 where a token is real [C, W]) of each class's value text
  as bios render it (birth date: the month; company city: the HQ city)."""
  firsts = [renderer.month0] + [renderer.value0[a] for a in ATTRIBUTES[1:]]
  out = []
  for first, c in zip(firsts, n_classes()):
    ids_CW, lens_C = renderer.render((first + np.arange(c))[:, None], np.zeros(1, bool)).padded(0)
    out.append((ids_CW, (np.arange(ids_CW.shape[1]) < lens_C[:, None]).astype(np.float32)))
  return out
