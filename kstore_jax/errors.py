"""The error every layer raises for a bad config, flag or input file (the bottom layer: no
imports of kstore_jax): the tools print its one-line message and exit with status 2
(`cli.run`)."""

import os


class ConfigError(ValueError):
  """A bad config, flag or input file; its message is one line naming the culprit."""


def no_file(what: str, path: str) -> ConfigError:
  """The error for `path`, given as `what` (a config key or flag), where no file is: a
  directory is said to be one."""
  if os.path.isdir(path):
    return ConfigError(f"{what}: {path!r} is a directory, not a file")
  return ConfigError(f"{what}: no such file {path!r}")
