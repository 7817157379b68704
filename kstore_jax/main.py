"""`python -m kstore_jax.main`: run an experiment.

The tool is kstore_jax/tools/main.py; this module only runs it."""

if __name__ == "__main__":
  from kstore_jax.tools import main
  main.run()
