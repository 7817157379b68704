"""The population table: deterministic, unique names, uniform attributes, O(N) memory."""

import dataclasses
import math
import statistics

import numpy as np
import pytest

from kstore_jax.data import pools as pools_lib
from kstore_jax.data import population
from kstore_jax.data.templates import ATTRIBUTES

COLUMNS = ("first", "middle", "last", "gender", "birth_day", "birth_month", "birth_year",
           "birth_city", "university", "major", "company")


def columns(pop):
  return {f.name: getattr(pop, f.name) for f in dataclasses.fields(pop)
          if isinstance(getattr(pop, f.name), np.ndarray)}


def name_keys(pop):
  p = pools_lib.load_pools()
  return ((pop.first.astype(np.int64) * len(p.middle_names) + pop.middle)
          * len(p.last_names) + pop.last)


def test_columns_are_the_expected_ones():
  pop = population.make_population(0, 10)
  assert set(columns(pop)) == set(COLUMNS)
  assert len(pop) == 10
  assert all(len(c) == 10 for c in columns(pop).values())


def test_same_seed_same_population():
  a, b = population.make_population(3, 200), population.make_population(3, 200)
  for name, col in columns(a).items():
    np.testing.assert_array_equal(col, getattr(b, name), err_msg=name)
    assert col.dtype == getattr(b, name).dtype
  assert [a.values(i) for i in range(200)] == [b.values(i) for i in range(200)]


def test_different_seeds_differ():
  a, b = population.make_population(3, 200), population.make_population(4, 200)
  for name, col in columns(a).items():
    assert not np.array_equal(col, getattr(b, name)), name


def test_sizes_are_exact():
  for n in (1, 2, 17, 200):
    assert len(population.make_population(0, n)) == n


@pytest.mark.parametrize("n", [200, 200_000])
def test_full_names_unique(n):
  pop = population.make_population(0, n)
  assert len(np.unique(name_keys(pop))) == n
  if n <= 200:
    names = [pop.full_name(i) for i in range(n)]
    assert len(set(names)) == n
    assert all(pop.find(name) == i for i, name in enumerate(names))


def test_find_unknown_name():
  pop = population.make_population(0, 20)
  with pytest.raises(KeyError):
    pop.find("Nobody Atall Here")


def test_company_city_is_company_hq():
  p = pools_lib.load_pools()
  hq = dict(line.split("\t") for line in
            (pools_lib.POOL_DIR / "companies.txt").read_text().splitlines())
  pop = population.make_population(1, 200)
  np.testing.assert_array_equal(pop.company_city, p.company_hq[pop.company])
  for i in range(200):
    v = pop.values(i)
    assert v["company_city"] == hq[v["company"]]
    assert v["company_city"] == p.hq_cities[pop.attribute("company_city")[i]]


def test_values_match_class_ids():
  p = pools_lib.load_pools()
  pop = population.make_population(2, 100)
  for i in range(100):
    v = pop.values(i)
    assert v["birth_city"] == p.birth_cities[pop.birth_city[i]]
    assert v["university"] == p.universities[pop.university[i]]
    assert v["major"] == p.majors[pop.major[i]]
    assert v["company"] == p.companies[pop.company[i]]
    month, rest = v["birth_date"].split(" ", 1)
    day, year = rest.split(", ")
    assert month == population.MONTHS[pop.birth_month[i]]
    assert int(day) == pop.birth_day[i] + 1 and 1 <= int(day) <= population.N_DAYS
    assert int(year) == population.FIRST_YEAR + pop.birth_year[i]
    bd = pop.birth_date[i]
    y, m, d = int(pop.birth_year[i]), int(pop.birth_month[i]), int(pop.birth_day[i])
    assert bd == (y * 12 + m) * population.N_DAYS + d
  assert set(pop.gender.tolist()) <= {0, 1}
  for a in ATTRIBUTES:
    assert len(pop.attribute(a)) == 100
  with pytest.raises(KeyError):
    pop.attribute("shoe_size")


def chi2_quantile(dof: int, q: float = 0.999) -> float:
  """Wilson-Hilferty normal approximation of the chi-square q quantile."""
  z = statistics.NormalDist().inv_cdf(q)
  c = 2.0 / (9.0 * dof)
  return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_uniform(x: np.ndarray, k: int) -> float:
  counts = np.bincount(np.asarray(x, np.int64), minlength=k)
  assert len(counts) == k, "value out of range"
  expected = len(x) / k
  return float(((counts - expected) ** 2 / expected).sum())


def test_chi2_bound_sanity():
  # Known values: chi2(0.999; 10) = 29.59, chi2(0.999; 100) = 149.45.
  assert abs(chi2_quantile(10) - 29.59) < 0.5
  assert abs(chi2_quantile(100) - 149.45) < 1.0
  assert abs(chi2_quantile(262, 0.99) - 317.3) < 1.0
  # The test rejects a clearly skewed draw.
  rng = np.random.default_rng(0)
  skewed = np.minimum(rng.integers(0, 12, 20_000), rng.integers(0, 12, 20_000))
  assert chi2_uniform(skewed, 12) > chi2_quantile(11)


def test_attribute_draws_are_uniform():
  n = 20_000
  p = pools_lib.load_pools()
  pop = population.make_population(0, n)
  sizes = {
      "gender": 2, "birth_day": population.N_DAYS, "birth_month": 12,
      "birth_year": population.N_YEARS, "birth_city": len(p.birth_cities),
      "university": len(p.universities), "major": len(p.majors),
      "company": len(p.companies), "first": len(p.first_names),
      "middle": len(p.middle_names), "last": len(p.last_names),
  }
  assert set(sizes) == set(COLUMNS)
  # 12 tests: each at 1 - 0.001/12 (Bonferroni), so the family passes a fair draw 99.9%.
  q = 1 - 0.001 / 12
  for name, k in sizes.items():
    col = getattr(pop, name)
    assert col.min() >= 0 and col.max() < k, name
    stat = chi2_uniform(col, k)
    assert stat < chi2_quantile(k - 1, q), (name, stat, chi2_quantile(k - 1, q))
  # Independence of two draws: (gender, month) is uniform over the 24 pairs.
  stat = chi2_uniform(pop.gender.astype(np.int64) * 12 + pop.birth_month, 24)
  assert stat < chi2_quantile(23, q)
  # Derived company_city follows the company -> HQ map (not uniform, but exact).
  expected = np.bincount(p.company_hq, minlength=len(p.hq_cities)) / len(p.companies)
  got = np.bincount(pop.company_city, minlength=len(p.hq_cities)) / n
  assert np.abs(got - expected).max() < 0.02


def test_memory_is_linear_and_small():
  for n in (1_000, 100_000):
    pop = population.make_population(0, n)
    total = sum(c.nbytes for c in columns(pop).values())
    assert total / n <= 24, total / n


def test_rejects_too_many_people():
  space = pools_lib.load_pools().name_space
  assert space == 400 * 400 * 1000
  with pytest.raises(ValueError, match=r"data\.n_people"):
    population.make_population(0, space // 2 + 1)
  with pytest.raises(ValueError, match=r"data\.n_people"):
    population.make_population(0, 0)
