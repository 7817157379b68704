"""The value pools (names, cities, universities, majors, companies) shipped as text files."""

import dataclasses
import functools
import pathlib

import numpy as np

POOL_DIR = pathlib.Path(__file__).parent / "pools"


def _lines(name: str) -> list[str]:
  return (POOL_DIR / name).read_text(encoding="utf-8").splitlines()


@dataclasses.dataclass(frozen=True)
class Pools:
  """All value lists; `company_hq[i]` indexes `hq_cities` for company i."""
  first_names: tuple[str, ...]
  middle_names: tuple[str, ...]
  last_names: tuple[str, ...]
  birth_cities: tuple[str, ...]
  universities: tuple[str, ...]
  majors: tuple[str, ...]
  companies: tuple[str, ...]
  hq_cities: tuple[str, ...]
  company_hq: np.ndarray

  @property
  def name_space(self) -> int:
    return len(self.first_names) * len(self.middle_names) * len(self.last_names)


@functools.cache
def load_pools() -> Pools:
  companies, hqs = zip(*(line.split("\t") for line in _lines("companies.txt")))
  hq_cities = tuple(sorted(set(hqs)))
  index = {c: i for i, c in enumerate(hq_cities)}
  return Pools(
      first_names=tuple(_lines("first_names.txt")),
      middle_names=tuple(_lines("middle_names.txt")),
      last_names=tuple(_lines("last_names.txt")),
      birth_cities=tuple(_lines("birth_cities.txt")),
      universities=tuple(_lines("universities.txt")),
      majors=tuple(_lines("majors.txt")),
      companies=tuple(companies),
      hq_cities=hq_cities,
      company_hq=np.array([index[h] for h in hqs], np.int16),
  )
