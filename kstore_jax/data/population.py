"""The bioS population: a table of integer attribute ids, deterministic from the seed."""

import dataclasses
import itertools

import numpy as np

from kstore_jax.data import hashing, pools as pools_lib
from kstore_jax.data.templates import ATTRIBUTES

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
N_DAYS, FIRST_YEAR, N_YEARS = 28, 1900, 200
_H_NAME, _H_ATTR = 0x9E1, 0x9E2        # hash purposes of per-person populations


@dataclasses.dataclass(frozen=True)
class Population:
  """N people as NumPy columns (O(N) memory: 19 bytes per person).

  Names are (first, middle, last) indices into the pools and unique per person.
  `gender` is 0 (he) / 1 (she). Birth date is (day 0..27, month 0..11, year offset 0..199).
  `company_city` is derived: the company's headquarters.
  """
  seed: int
  first: np.ndarray
  middle: np.ndarray
  last: np.ndarray
  gender: np.ndarray
  birth_day: np.ndarray
  birth_month: np.ndarray
  birth_year: np.ndarray
  birth_city: np.ndarray
  university: np.ndarray
  major: np.ndarray
  company: np.ndarray

  def __len__(self) -> int:
    return len(self.first)

  @property
  def company_city(self) -> np.ndarray:
    return pools_lib.load_pools().company_hq[self.company]

  @property
  def birth_date(self) -> np.ndarray:
    """A single class id per date: (year * 12 + month) * 28 + day."""
    return ((self.birth_year.astype(np.int32) * 12 + self.birth_month) * N_DAYS
            + self.birth_day)

  def value_counts(self) -> dict[str, int]:
    """Number of possible values (classes) of each attribute (birth date: every date)."""
    p = pools_lib.load_pools()
    return {"birth_date": N_YEARS * len(MONTHS) * N_DAYS, "birth_city": len(p.birth_cities),
            "university": len(p.universities), "major": len(p.majors),
            "company": len(p.companies), "company_city": len(p.hq_cities)}

  def attribute(self, name: str) -> np.ndarray:
    """Class id of attribute `name` for every person."""
    if name not in ATTRIBUTES:
      raise KeyError(f"unknown attribute {name!r}; expected one of {ATTRIBUTES}")
    return np.asarray(getattr(self, name))

  def content(self) -> list:
    """Everything that tells people apart (arrays), for World.digest."""
    return [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "seed"]

  def full_name(self, person: int) -> str:
    p = pools_lib.load_pools()
    return " ".join((p.first_names[self.first[person]], p.middle_names[self.middle[person]],
                     p.last_names[self.last[person]]))

  def values(self, person: int) -> dict[str, str]:
    """Attribute texts of one person."""
    p = pools_lib.load_pools()
    return {
        "birth_date": (f"{MONTHS[self.birth_month[person]]} {self.birth_day[person] + 1}, "
                       f"{FIRST_YEAR + self.birth_year[person]}"),
        "birth_city": p.birth_cities[self.birth_city[person]],
        "university": p.universities[self.university[person]],
        "major": p.majors[self.major[person]],
        "company": p.companies[self.company[person]],
        "company_city": p.hq_cities[self.company_city[person]],
    }

  def find(self, full_name: str) -> int:
    """Index of the person with this full name (KeyError if none)."""
    p = pools_lib.load_pools()
    parts = full_name.split()
    try:
      f, m, l = (p.first_names.index(parts[0]), p.middle_names.index(parts[1]),
                 p.last_names.index(parts[2]))
    except (ValueError, IndexError):
      raise KeyError(f"no person named {full_name!r}") from None
    hit = np.flatnonzero((self.first == f) & (self.middle == m) & (self.last == l))
    if not len(hit):
      raise KeyError(f"no person named {full_name!r}")
    return int(hit[0])


def _unique_names(rng: np.random.Generator, n: int, space: int) -> np.ndarray:
  """n distinct name keys in [0, space), in draw order (reject duplicates and redraw)."""
  keys = np.empty(0, np.int64)
  while len(keys) < n:
    need = n - len(keys)
    cand = rng.integers(0, space, size=need + need // 16 + 16)
    merged = np.concatenate([keys, cand])
    _, first_seen = np.unique(merged, return_index=True)
    keys = merged[np.sort(first_seen)]
  return keys[:n]


def _unique_names_per_person(seed: int, n: int, space: int) -> np.ndarray:
  """The first n distinct values of the stream hash(seed, j) % space, j = 0, 1, ...: the first
  k keys are the same for every n >= k."""
  m = n + n // 16 + 16
  while True:
    stream = hashing.uniform_int(space, seed, _H_NAME, np.arange(m))
    _, first_seen = np.unique(stream, return_index=True)
    if len(first_seen) >= n:
      return stream[np.sort(first_seen)[:n]]
    m *= 2


def make_population(seed: int, n_people: int, per_person: bool = False) -> Population:
  """Draw `n_people` with unique names and uniform, independent attributes.

  per_person: every person's name and attributes are hashes of (seed, person id) (names:
  the first unused one of a hashed stream), so the first k people are the same for every
  n_people >= k. Grouped populations (data.groups) use it: a group laid out first keeps its
  people when groups after it are added or removed. The default draws from one NumPy stream.
  """
  p = pools_lib.load_pools()
  if not 1 <= n_people <= p.name_space // 2:
    raise ValueError(f"data.n_people={n_people} must be in [1, {p.name_space // 2}] "
                     f"(half the name space of {p.name_space})")
  n_mid, n_last = len(p.middle_names), len(p.last_names)
  if per_person:
    keys = _unique_names_per_person(seed, n_people, p.name_space)
    column = itertools.count()           # one hash purpose per drawn column

    def draw(k, dtype=np.int16):
      people = np.arange(n_people)
      return hashing.uniform_int(k, seed, _H_ATTR, next(column), people).astype(dtype)
  else:
    rng = np.random.default_rng([seed, 0x9E0])
    keys = _unique_names(rng, n_people, p.name_space)

    def draw(k, dtype=np.int16):
      return rng.integers(0, k, size=n_people, dtype=dtype)

  first, rest = np.divmod(keys, n_mid * n_last)
  middle, last = np.divmod(rest, n_last)
  return Population(
      seed=seed,
      first=first.astype(np.int16), middle=middle.astype(np.int16), last=last.astype(np.int16),
      gender=draw(2, np.int8),
      birth_day=draw(N_DAYS, np.int8), birth_month=draw(12, np.int8),
      birth_year=draw(N_YEARS),
      birth_city=draw(len(p.birth_cities)), university=draw(len(p.universities)),
      major=draw(len(p.majors)), company=draw(len(p.companies)),
  )
