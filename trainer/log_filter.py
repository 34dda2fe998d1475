"""Keeps the console readable: libraries' INFO chatter is dropped, their warnings still show."""

from __future__ import annotations

import logging

from absl import logging as absl_logging

# Libraries that log every checkpoint, pipeline and export detail at INFO.
_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/jax/_src/", "/tensorflow/")
# Warnings that only restate what we asked for (reading a checkpoint read-only, or only some of
# its items).
_EXPECTED_WARNINGS = (
  "CheckpointManagerOptions.read_only=True",
  "Given directory is read only",
  "was found in the checkpoint, but could not be restored",
)


class _LibraryInfoFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    from_library = any(part in record.pathname for part in _CHATTY_LIBRARIES)
    if not from_library:
      return True
    if record.levelno < logging.WARNING:
      return False
    message = record.getMessage()
    return not any(expected in message for expected in _EXPECTED_WARNINGS)


def quiet_library_info_logs() -> None:
  """Installs the filter (call once, from an entrypoint): on absl's handler, and on the `absl`
  logger itself, which libraries log through also when absl's handler is not the one printing
  (commands not started by `app.run` print through Python's root handler)."""
  library_filter = _LibraryInfoFilter()
  absl_logging.get_absl_handler().addFilter(library_filter)
  logging.getLogger("absl").addFilter(library_filter)
