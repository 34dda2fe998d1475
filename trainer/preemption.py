"""Preemption (SIGTERM): every process saves a checkpoint at the same step, then exits cleanly.

One process: a Python SIGTERM handler records the request. Several processes (after
`jax.distributed.initialize`): JAX's preemption service receives the signal on whichever process
got it and agrees with all the others on one step to stop at
(`multihost_utils.reached_preemption_sync_point`), so their checkpoint is consistent.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Context manager; `should_stop(step)` must be called by every process at every step."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._multi_process = False
    self._was_blocked = False

  def should_stop(self, step: int) -> bool:
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.warning(
      "Received signal %d: saving a checkpoint at the current step, then exiting.", signum
    )
    self._event.set()

  def __enter__(self) -> PreemptionWatcher:
    self._multi_process = jax.process_count() > 1
    # JAX's preemption service owns SIGTERM in multi-process runs; Python may only install
    # handlers from the main thread.
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    if threading.current_thread() is threading.main_thread():
      # trainer.main blocks SIGTERM until now, so one sent during setup is delivered here.
      previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
      self._was_blocked = signal.SIGTERM in previous_mask
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if self._was_blocked:
      # Blocked again for the rest of the run (final save, eval, report): a SIGTERM now waits
      # and the process still exits 0 with its last checkpoint complete.
      signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
