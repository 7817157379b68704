"""`python -m kstore_jax.bench`: benchmarks.

The tool is kstore_jax/tools/bench.py; this module only runs it."""

if __name__ == "__main__":
  from kstore_jax.tools import bench
  bench.run()
