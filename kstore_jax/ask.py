"""`python -m kstore_jax.ask`: ask a trained run QA questions.

The tool is kstore_jax/tools/ask.py; this module only runs it."""

if __name__ == "__main__":
  from kstore_jax.tools import ask
  ask.run()
