"""Exceptions that reach the user: each names the offending value and how to fix it."""


class ConfigError(ValueError):
  """The config, its data or its workdir cannot be used as given; nothing was written."""


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient norm; the bad state was not checkpointed."""
