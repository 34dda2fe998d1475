"""The step watchdog and the bounded window of steps in flight (trainer/watchdog.py)."""

import logging
import threading
import time

import jax.numpy as jnp
import pytest

from trainer import watchdog


def test_window_waits_for_the_oldest_beyond_its_size():
  window = watchdog.InFlightWindow(2)
  assert window.push(1, jnp.ones(3)) == []
  assert window.push(2, jnp.ones(3)) == []
  assert window.push(3, jnp.ones(3)) == [1]
  assert window.push(4, jnp.ones(3)) == [2]
  assert window.drain() == [3, 4]
  assert window.drain() == []
  with pytest.raises(ValueError, match="window size 0"):
    watchdog.InFlightWindow(0)


def _stalled(dog: watchdog.StepWatchdog, stage: str, seconds: float) -> None:
  with dog, dog.stage(stage):
    time.sleep(seconds)


def test_a_stall_reports_the_stage_and_every_thread_then_exits(caplog):
  exits = []
  dog = watchdog.StepWatchdog(timeout_s=0.5, floor_s=0.1, on_stall=exits.append, environ={})
  helper = threading.Thread(target=time.sleep, args=(3,), name="reader-helper", daemon=True)
  helper.start()
  with caplog.at_level(logging.ERROR):
    _stalled(dog, "checkpoint", 2.5)
  assert exits == [watchdog.STALL_EXIT_CODE]
  text = caplog.text
  assert "no progress for" in text and "in stage 'checkpoint'" in text
  assert "last completed step none" in text
  # Every thread's Python stack: the stalled main thread (in _stalled) and the helper.
  assert "thread MainThread" in text and "in _stalled" in text
  assert "thread reader-helper" in text


def test_progress_keeps_it_quiet_and_the_auto_timeout_follows_the_step_time():
  exits = []
  dog = watchdog.StepWatchdog(floor_s=0.4, on_stall=exits.append, environ={})
  assert dog.timeout() == 0.4  # Compiling: the floor.
  with dog:
    for step in range(1, 41):  # 2 s of steps, each 0.05 s: far beyond the floor in total.
      time.sleep(0.05)
      dog.dispatched(step, jnp.ones(2))
    dog.drain()
  assert exits == []
  # About 100 x the ~0.05 s step time (the floor is lower; the decay lowers it a little).
  assert 2.0 <= dog.timeout() < 15.0


def test_injected_input_stall_sleeps_in_the_input_stage(caplog):
  exits = []
  dog = watchdog.StepWatchdog(
    timeout_s=0.5,
    floor_s=0.1,
    on_stall=exits.append,
    environ={watchdog.STALL_INJECTION_ENV: "2:1.5"},
  )
  batches = iter(range(10))
  with caplog.at_level(logging.ERROR), dog:
    assert dog.next_batch(batches, 1) == 0  # Not the stalled step.
    assert dog.next_batch(batches, 2) == 1  # Sleeps 1.5 s > timeout, then returns.
  assert exits == [watchdog.STALL_EXIT_CODE]
  assert "in stage 'input'" in caplog.text
