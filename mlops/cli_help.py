"""`--help` for the CLIs that parse their own `flags.FlagValues` instead of absl's global one.

They do so because other code imports them (tests, other CLIs, the pipeline), and their flags
must not join the importer's; absl's app.run, which answers `--help` for the global flags, is
not theirs. This gives them the same answer: the module's docstring, then its flags.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

HELP_FLAGS = frozenset({"-h", "--help", "--helpshort", "--helpfull"})


def help_requested(args: Sequence[str]) -> bool:
  """Whether the command-line arguments `args` (without the program name) ask for help."""
  return not HELP_FLAGS.isdisjoint(args)


def help_text(doc: str | None, flag_values: flags.FlagValues) -> str:
  """What `--help` prints: `doc` (the CLI module's docstring) and every flag with its help."""
  return f"{(doc or '').strip()}\n\nflags:\n{flag_values.get_help()}"
