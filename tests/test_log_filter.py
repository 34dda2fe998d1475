"""The console filter: libraries' expected warnings and INFO lines are dropped on every path."""

import logging

from trainer import log_filter


def _record(pathname: str, level: int, message: str) -> logging.LogRecord:
  return logging.getLogger("absl").makeRecord("absl", level, pathname, 1, message, (), None)


def test_orbax_read_only_warnings_are_dropped_even_without_absls_handler():
  logger = logging.getLogger("absl")
  for installed in list(logger.filters):  # Another test's command may have installed one.
    logger.removeFilter(installed)
  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  read_only = _record(orbax, logging.WARNING, "Given directory is read only=/tmp/run/checkpoints")
  real_warning = _record(orbax, logging.WARNING, "Checkpoint step 7 is corrupt")
  chatter = _record(orbax, logging.INFO, "Saving item to /tmp/run")
  ours = _record("/repo/trainer/train.py", logging.INFO, "eval at step 7")
  assert logger.filter(read_only)  # Before: nothing filters the `absl` logger itself.
  log_filter.quiet_library_info_logs()
  assert not logger.filter(read_only)
  assert not logger.filter(chatter)
  assert logger.filter(real_warning)
  assert logger.filter(ours)
