"""Run an experiment: `python -m kstore_jax.main --config=configs/multi5_permute.py:tiny
--workdir=DIR [--config.model.num_layers=4 ...]`.

Everything is validated before the workdir is touched; errors are one line naming the culprit.
"""

import sys

from absl import flags

from kstore_jax import configlib
from kstore_jax.tools import cli, runtime

_CONFIG = cli.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory (created if missing).")


def main(argv):
  if len(argv) > 1:
    raise configlib.ConfigError(f"unexpected argument {argv[1]!r}")
  if not _WORKDIR.value:
    raise configlib.ConfigError("--workdir is required")
  runtime.maybe_initialize_distributed()
  import jax
  from kstore_jax import experiment
  from kstore_jax.model import attention

  cfg = _CONFIG.value
  platform = attention.platform_of(jax.devices())
  runtime.use_compile_cache(cfg.train.compile_cache)
  with cli.config_errors():   # a bad input file (tokenizer, data.source) is one line too
    exp, tok = experiment.open_experiment(cfg, _WORKDIR.value, jax.device_count(), platform)
  exp.check_first_fits()
  exp.start(tok)
  try:
    exp.run()
  except (experiment.loop.NonFiniteLoss, experiment.loop.Interrupted) as e:
    print(f"kstore_jax: {e}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
  """`python -m kstore_jax.main` (the shim kstore_jax/main.py calls this)."""
  runtime.prepare_process()   # CPU: malloc on 2 MiB pages, steps run inline (heap.py)
  cli.run(main, "kstore_jax.main")
