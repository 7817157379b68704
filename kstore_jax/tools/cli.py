"""Shared plumbing for the command-line tools (`python -m kstore_jax.<tool>`).

    FLAGS_CONFIG = cli.config_flag()
    def main(argv): cfg = cli.validated_config(FLAGS_CONFIG.value); ...
    def run(): cli.run(main, "kstore_jax.<tool>")   # the shim kstore_jax/<tool>.py calls it

`run` checks `--config=...` and its `--config.a.b=v` overrides before absl parses them (a
missing file or an unknown key would otherwise be a long traceback), and turns a ConfigError
raised inside `main` into one line on stderr and exit status 2 (an OSError naming a file:
one line, status 1). `--help` shows the tool module's docstring and flags, though the
program absl runs is the shim. A process started
as `python -m kstore_jax.<tool>` then ends without the interpreter's teardown
(`exit_without_teardown`).
"""

import atexit
import contextlib
import os
import runpy
import sys
import threading
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kstore_jax import configlib
from kstore_jax.configlib import ConfigError

HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def config_flag(help_string: str = "experiment config: path.py[:arg], e.g. "
                "configs/tiny.py or configs/base.py:small; override keys with "
                "--config.data.n_people=200"):
  """Define `--config` (an ml_collections config file, locked against new keys).

  It is made a key flag of the calling module, so that the tool's `--help` lists it.
  """
  holder = config_flags.DEFINE_config_file("config", None, help_string, lock_config=True)
  caller = sys._getframe(1).f_globals.get("__name__", "")
  flags.FLAGS.register_key_flag_for_module(
      sys.argv[0] if caller == "__main__" else caller, flags.FLAGS["config"])
  return holder


def wants_help(argv: list[str]) -> bool:
  return any(a.lstrip("-").split("=", 1)[0] in HELP_FLAGS for a in argv[1:] if a.startswith("-"))


def has_config(argv: list[str]) -> bool:
  return any(a == "--config" or a.startswith(("--config=", "--config.")) for a in argv[1:])


@contextlib.contextmanager
def config_errors():
  """Inside: a FileNotFoundError/ValueError (bad config or input file) becomes a ConfigError."""
  try:
    yield
  except ConfigError:
    raise
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e


def validated_config(cfg, n_devices: int = 1, platform: str | None = None):
  """The parsed `--config`, validated for `platform` (default: this machine's; ConfigError
  naming the first bad key)."""
  if cfg is None:
    raise ConfigError("--config is required (e.g. --config=configs/tiny.py)")
  with config_errors():
    configlib.validate(cfg, n_devices=n_devices, platform=platform)
  return cfg


def _help_as_main(tool) -> None:
  """absl's `--help` shows the program's main module: its docstring and its key flags. The
  program is the shim (`python -m kstore_jax.main` runs kstore_jax/main.py), the usage and
  flags are the tool's (kstore_jax/tools/main.py): show those."""
  program = sys.modules["__main__"]
  if tool is program:
    return
  program.__doc__ = tool.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(tool.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable, prog: str,
        config_required: bool | Callable[[list[str]], bool] = True) -> None:
  """`absl.app.run(main)` with one-line config and flag errors (stderr, exit status 2); in a
  process started as the tool (`started_as_program(prog)`: `prog` names the tool's module),
  then the end of the process (`exit_without_teardown`; an exception other than SystemExit
  ends it as usual, with its traceback).

  `config_required` may be a predicate of argv (e.g. only some subcommands need a config).
  """
  if not started_as_program(prog):   # the caller's code runs after the tool: the usual exit
    _run(main, prog, config_required)
    return
  try:
    _run(main, prog, config_required)
  except SystemExit as e:
    exit_without_teardown(e.code)
  exit_without_teardown(0)


def started_as_program(module: str) -> bool:
  """Whether this process is `python -m <module>` itself: the interpreter's runpy entry for
  that module at the bottom of the stack, not a profiler, debugger or script that runs it
  (`python -m cProfile -m kstore_jax.main ...` writes its profile after the tool returns)."""
  frame = sys._getframe()   # pylint: disable=protected-access
  while frame.f_back is not None:
    frame = frame.f_back
  entry = getattr(runpy, "_run_module_as_main", None)
  return (entry is not None and frame.f_code is entry.__code__
          and frame.f_locals.get("mod_name") == module)


def exit_without_teardown(code) -> None:
  """End the process with `sys.exit(code)`'s status as the interpreter's exit would (non-daemon
  threads joined, atexit handlers run: logging, multiprocessing's workers, orbax; stdout and
  stderr flushed) but without tearing down every module first: after a run that is 0.3-1.5
  CPU-s of garbage collection and deallocation (BENCHMARKS.md), and the OS frees the memory
  anyway. Every file the tools write is closed (or, the run lock, released) by then. Where
  this Python has no `threading._shutdown` (its exit's first step), a plain sys.exit."""
  shutdown = getattr(threading, "_shutdown", None)
  if shutdown is None:
    sys.exit(code)
  if code is None:
    status = 0
  elif isinstance(code, int):
    status = code
  else:   # sys.exit("message"): the message on stderr, status 1
    print(code, file=sys.stderr)
    status = 1
  shutdown()
  atexit._run_exitfuncs()   # pylint: disable=protected-access
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except OSError:   # (e.g. a closed pipe) the interpreter's exit status for a failed flush
    status = 120
  os._exit(status)


def _run(main: Callable, prog: str, config_required) -> None:
  _help_as_main(sys.modules[main.__module__])
  argv = sys.argv
  if wants_help(argv):
    try:
      app.run(main)
    except SystemExit as e:  # absl exits with status 1 after printing the help
      sys.exit(0 if e.code == 1 else e.code)
    return
  required = config_required(argv) if callable(config_required) else config_required
  if required or has_config(argv):
    try:
      configlib.precheck_argv(argv)
    except ConfigError as e:
      configlib.fail(str(e), prog)

  def parse_flags(args):   # absl's own parser prints two lines (FATAL ..., a hint), exit 1
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      configlib.fail(" ".join(str(e).split()), prog)

  def guarded(args):
    if not flags.FLAGS["verbosity"].present:   # jax/orbax/grain INFO lines drown the output
      logging.set_verbosity(logging.WARNING)
    try:
      return main(args)
    except ConfigError as e:
      configlib.fail(str(e), prog)
    except OSError as e:
      # a file the system refused (permissions, a full disk, a path under a file): one line
      # naming it, status 1; an OSError naming no file as raised
      if e.filename is None:
        raise
      configlib.fail(f"{e.filename}: {e.strerror or e}", prog, status=1)

  app.run(guarded, flags_parser=parse_flags)
