"""The error every layer raises for a bad config, flag or input file (the bottom layer: no
imports): the tools print its one-line message and exit with status 2 (`cli.run`)."""


class ConfigError(ValueError):
  """A bad config, flag or input file; its message is one line naming the culprit."""
