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
  """Installs the filter on absl's handler (call once, from an entrypoint)."""
  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())
