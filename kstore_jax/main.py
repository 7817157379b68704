"""Run an experiment: `python -m kstore_jax.main --config=configs/multi5_permute.py:tiny
--workdir=DIR [--config.model.num_layers=4 ...]`.

Everything is validated before the workdir is touched; errors are one line naming the culprit.
"""

import os
import sys

from absl import flags

from kstore_jax import cli, configlib

_CONFIG = cli.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory (created if missing).")


def maybe_initialize_distributed() -> None:
  """Multi-process runs (TPU pods, SLURM, or KSTORE_NUM_PROCESSES) join one JAX cluster."""
  import jax
  if any(v in os.environ for v in ("KSTORE_NUM_PROCESSES", "SLURM_NTASKS", "TPU_WORKER_ID",
                                   "JAX_COORDINATOR_ADDRESS")):
    n = int(os.environ.get("KSTORE_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", "0")) or 0)
    if n == 1:
      return
    kwargs = {}
    if "KSTORE_NUM_PROCESSES" in os.environ:
      kwargs = dict(coordinator_address=os.environ["KSTORE_COORDINATOR"], num_processes=n,
                    process_id=int(os.environ["KSTORE_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


def use_compile_cache(path: str) -> None:
  """jax's persistent compilation cache in `path` (train.compile_cache; '' = off), unless the
  environment names one already (JAX_COMPILATION_CACHE_DIR): reruns, resumed stages and the
  rows of a grid that share shapes then load their executables instead of compiling them."""
  import jax
  if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def main(argv):
  if len(argv) > 1:
    raise configlib.ConfigError(f"unexpected argument {argv[1]!r}")
  if not _WORKDIR.value:
    raise configlib.ConfigError("--workdir is required")
  maybe_initialize_distributed()
  import jax
  from kstore_jax import experiment
  from kstore_jax.data import tokenizer as tokenizer_lib
  from kstore_jax.model import attention

  cfg = _CONFIG.value
  configlib.validate(cfg, jax.device_count())
  use_compile_cache(cfg.train.compile_cache)
  tok = tokenizer_lib.get_tokenizer(cfg.data)
  workdir = experiment.Workdir(_WORKDIR.value)
  workdir.check_same_experiment(cfg, attention.platform_of(jax.devices()))
  exp = experiment.Experiment(cfg, tok, workdir)   # validates seq_len against the documents
  workdir.lock()
  workdir.write_json("config.json", cfg.to_dict())
  if jax.process_index() == 0:
    tok.save(workdir.file("tokenizer.json"))
  try:
    exp.run()
  except (experiment.loop.NonFiniteLoss, experiment.loop.Interrupted) as e:
    print(f"kstore_jax: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, "kstore_jax.main")
