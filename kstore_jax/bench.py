"""`python -m kstore_jax.bench`: benchmarks.

The tool is kstore_jax/tools/bench.py; this module only runs it."""

if __name__ == "__main__":
  from kstore_jax import heap
  heap.use_huge_pages()   # CPU: malloc on 2 MiB pages (a re-execution; heap.py)
  from kstore_jax.tools import bench
  bench.run()
