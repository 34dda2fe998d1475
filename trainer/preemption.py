"""SIGTERM (preemption) handling: the loop checkpoints at the current step and exits cleanly."""

from __future__ import annotations

import signal
import threading

from absl import logging


class PreemptionWatcher:
  """Context manager that records SIGTERM instead of dying, and restores the old handler on exit.

  Only the main thread can install signal handlers; elsewhere the watcher stays inert.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.warning(
      "Received signal %d: saving a checkpoint at the current step, then exiting.", signum
    )
    self._event.set()

  def __enter__(self) -> PreemptionWatcher:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
