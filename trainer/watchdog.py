"""Step progress: a bounded number of steps in flight, and a watchdog that ends a stalled run.

Why bound the steps in flight: with async dispatch the host can run far ahead of the devices.
On XLA:CPU (jaxlib 0.10.2) each device's execution is launched on one client thread pool of
max(cores, local devices) threads; a launch for a device that already has its maximum of
computations in flight blocks its thread, and a collective blocks its thread until every
participant arrives. Once the host is far enough ahead, the pool fills with such blocked threads
and the one participant still to arrive never gets a thread: the in-process rendezvous aborts
after 40 s (one process) or gloo waits forever (several). Waiting for step N - window before
dispatching step N keeps every device far below that limit. docs/cpu_collective_deadlock.md has
the reproduction and the upstream report.

Why a watchdog: a process whose peers are alive but stuck (a collective that never completes, a
hung filesystem, a reader thread that died) passes every heartbeat. When no step completes for
the stall timeout, the watchdog logs the stage the loop was in and the Python stack of every
thread, then exits the process with STALL_EXIT_CODE; every process runs its own, so all of them
exit and the scheduler's restart resumes from the last checkpoint. A hang that holds the GIL would stop
the watchdog's own thread too; faulthandler's C-level timer, re-armed by that thread every
second, then dumps every thread's stack and exits with status 1.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import jax
import ml_collections
from absl import logging

# Exit status of a process the watchdog ended (distinct from 1, bad input, and 134, an abort).
STALL_EXIT_CODE = 3
# Test-only: "STEP:SECONDS" makes the input stage of that step sleep, to rehearse a stall.
STALL_INJECTION_ENV = "TRAINER_TEST_STALL_INPUT"
# Steps dispatched but not yet known complete; far below XLA:CPU's per-device in-flight limit.
DEFAULT_MAX_IN_FLIGHT = 4
# Auto timeout: this many times the measured step time, but never below the floor.
_STEP_TIME_MULTIPLE = 100.0


class InFlightWindow:
  """Keeps at most `size` dispatched results not yet known ready; blocks on the oldest beyond.

  `push` returns the tags of the results it waited for (their computations have finished).
  """

  def __init__(self, size: int = DEFAULT_MAX_IN_FLIGHT):
    if size < 1:
      raise ValueError(f"window size {size} must be >= 1")
    self._size = size
    self._pending: collections.deque = collections.deque()

  def push(self, tag, outputs) -> list:
    self._pending.append((tag, outputs))
    done = []
    while len(self._pending) > self._size:
      done.append(self._wait_oldest())
    return done

  def drain(self) -> list:
    return [self._wait_oldest() for _ in range(len(self._pending))]

  def _wait_oldest(self):
    tag, outputs = self._pending.popleft()
    jax.block_until_ready(outputs)
    return tag


class _Stage:
  """StepWatchdog.stage's context manager. A class rather than a contextlib generator: the loop
  enters four stages a step, at ~0.6 us each instead of ~3.6 us."""

  __slots__ = ("_name", "_previous", "_watchdog")

  def __init__(self, watchdog: StepWatchdog, name: str):
    self._watchdog, self._name = watchdog, name

  def __enter__(self) -> None:
    self._previous = self._watchdog._stage
    self._watchdog._set_stage(self._name)

  def __exit__(self, *exc) -> None:
    self._watchdog._set_stage(self._previous)


class StepWatchdog:
  """Context manager around the training loop; see the module docstring.

  The loop reports stages (`stage`), reads batches through `next_batch` and hands each
  dispatched step to `dispatched`. Until the first step has completed (compilation) the stall
  timeout is max(`floor_s`, `timeout_s`); then `timeout_s` if > 0, else max(`floor_s`, 100 x
  the measured step time). `on_stall` (default: exit the process) is for tests.
  """

  def __init__(
    self,
    *,
    timeout_s: float = 0.0,
    floor_s: float = 600.0,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    on_stall: Callable[[int], None] | None = None,
    environ=os.environ,
  ):
    self._timeout_s = timeout_s
    self._floor_s = floor_s
    self._window = InFlightWindow(max_in_flight)
    self._on_stall = on_stall or os._exit
    self._stall_injection = _parse_stall_injection(environ.get(STALL_INJECTION_ENV, ""))
    self._lock = threading.Lock()
    self._stage = "startup"
    self._last_progress = time.monotonic()
    self._last_completed: tuple[int, float] | None = None
    self._step_time: float | None = None
    self._completed_step: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @classmethod
  def from_config(cls, train_config: ml_collections.ConfigDict) -> StepWatchdog:
    return cls(timeout_s=train_config.stall_timeout_s, floor_s=train_config.stall_floor_s)

  def timeout(self) -> float:
    """Seconds without progress that count as a stall, now."""
    if self._completed_step is None:  # Compiling the first step: the floor applies.
      return max(self._floor_s, self._timeout_s)
    if self._timeout_s > 0:
      return self._timeout_s
    if self._step_time is None:
      return self._floor_s
    return max(self._floor_s, _STEP_TIME_MULTIPLE * self._step_time)

  def stage(self, name: str) -> _Stage:
    """`with stage(name)`: marks the loop as being in stage `name` (entering and leaving a stage
    count as progress), then restores the stage it was in."""
    return _Stage(self, name)

  def next_batch(self, iterator, step: int):
    """`next(iterator)` for step `step`, in the `input` stage."""
    with self.stage("input"):
      if self._stall_injection and self._stall_injection[0] == step:
        logging.warning(
          "Injected stall: sleeping %.0f s in the input stage.", self._stall_injection[1]
        )
        time.sleep(self._stall_injection[1])
      return next(iterator)

  def dispatched(self, step: int, outputs) -> None:
    """Records that `step` was dispatched; waits (stage `collective wait`) for old steps, and
    for the first one (its compilation is over once it ran)."""
    with self.stage("collective wait"):
      if self._completed_step is None:
        jax.block_until_ready(outputs)
        self._completed(step)
        return
      for done in self._window.push(step, outputs):
        self._completed(done)

  def drain(self) -> None:
    with self.stage("collective wait"):
      for done in self._window.drain():
        self._completed(done)

  def _completed(self, step: int) -> None:
    now = time.monotonic()
    with self._lock:
      if self._last_completed is not None:
        previous_step, previous_time = self._last_completed
        per_step = (now - previous_time) / max(step - previous_step, 1)
        # The slowest recent step time decays slowly, so a run that speeds up keeps its margin.
        self._step_time = max(per_step, 0.9 * self._step_time) if self._step_time else per_step
      self._last_completed = (step, now)
      self._completed_step = step
      self._last_progress = now

  def _set_stage(self, name: str) -> None:
    with self._lock:
      self._stage = name
      self._last_progress = time.monotonic()

  def __enter__(self) -> StepWatchdog:
    self._set_stage("loop (host work between stages)")
    self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread:
      self._thread.join()
    faulthandler.cancel_dump_traceback_later()

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self.timeout() / 10)):
      with self._lock:
        idle = time.monotonic() - self._last_progress
        stage, step = self._stage, self._completed_step
      timeout = self.timeout()
      # Backstop for a hang that holds the GIL (this thread then never runs again): faulthandler's
      # C thread dumps every thread's stack and exits 1 unless re-armed here in time.
      faulthandler.dump_traceback_later(max(timeout - idle, 0) + max(timeout, 60), exit=True)
      if idle > timeout:
        self._report_stall(stage, step, idle, timeout)
        self._on_stall(STALL_EXIT_CODE)
        return

  @staticmethod
  def _report_stall(stage: str, step: int | None, idle: float, timeout: float) -> None:
    logging.error(
      "Watchdog: no progress for %.0f s (stall timeout %.0f s) in stage '%s', last completed "
      "step %s, process %d/%d; dumping every thread's stack and exiting with status %d so the "
      "job restarts from its last checkpoint.",
      idle,
      timeout,
      stage,
      step if step is not None else "none",
      jax.process_index(),
      jax.process_count(),
      STALL_EXIT_CODE,
    )
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
      stack = "".join(traceback.format_stack(frame))
      logging.error("Watchdog: thread %s (%s):\n%s", names.get(ident, "?"), ident, stack)
    logging.flush()
    sys.stderr.flush()


def _parse_stall_injection(value: str) -> tuple[int, float] | None:
  if not value:
    return None
  step, _, seconds = value.partition(":")
  return int(step), float(seconds or 3600)
