"""`python -m kstore_jax.grid`: run a grid of experiments.

The tool is kstore_jax/tools/grid.py; this module only runs it."""

if __name__ == "__main__":
  from kstore_jax.tools import grid
  grid.run()
