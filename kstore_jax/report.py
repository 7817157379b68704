"""`python -m kstore_jax.report`: a table and plots of finished runs.

The tool is kstore_jax/tools/report.py; this module only runs it."""

if __name__ == "__main__":
  from kstore_jax.tools import report
  report.run()
