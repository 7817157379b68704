"""The suite's own machinery (tests/runs.py): the fast-compile flags keep what this jaxlib knows.
An XLA that no longer knows one of them (jax 0.12 dropped --xla_cpu_use_fusion_emitters) must
cost that flag alone, not the whole set: the suite then compiled every run at XLA's defaults
(on Python 3.12 with jax 0.12, BENCHMARKS.md session 28)."""

import runs


def test_an_unknown_fast_compile_flag_is_dropped_alone(monkeypatch):
  known = runs.FAST_COMPILE_FLAGS[0]
  monkeypatch.setattr(runs, "FAST_COMPILE_FLAGS", (known, "--xla_kstore_no_such_flag=true"))
  monkeypatch.delenv("KSTORE_TEST_FAST_FLAGS")
  runs.fast_compile_flags.cache_clear()
  try:
    assert runs.fast_compile_flags() == known
  finally:   # the session's answer again (monkeypatch restores the environment after this)
    runs.fast_compile_flags.cache_clear()


def test_optimized_jit_sets_back_only_the_flags_in_use(monkeypatch):
  monkeypatch.setenv("KSTORE_TEST_FAST_FLAGS", "--xla_backend_optimization_level=0")
  runs.fast_compile_flags.cache_clear()
  try:
    assert runs.xla_defaults() == {"xla_backend_optimization_level": 3}
    assert int(runs.optimized_jit(lambda x: x + 1)(1)) == 2
  finally:
    runs.fast_compile_flags.cache_clear()
