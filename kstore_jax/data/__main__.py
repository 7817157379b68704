"""`python -m kstore_jax.data`: look at or export the data a config makes.

The tool is kstore_jax/tools/data.py (a tool, above the library, so not in the data package);
this module only runs it."""

if __name__ == "__main__":
  from kstore_jax.tools import data
  data.run()
