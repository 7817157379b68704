"""`python -m kstore_jax.inspect`: look inside a run directory.

The tool is kstore_jax/tools/inspect.py; this module only runs it."""

if __name__ == "__main__":
  from kstore_jax.tools import inspect
  inspect.run()
