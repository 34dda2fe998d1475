"""The canary controller: a metric-driven canary of a registry version, with Flagger's semantics.

`run` is the loop; mlops/rollout.py's `canary` subcommand (`canary_main`) wires it to the
registry (mlops/canary_registry.py), the server's traffic config (mlops/canary_traffic.py) and
the prediction logs (mlops/canary_checks.py):

1. the split pins the model's unlabelled requests to the stable label (weight 0, then
   `settle_s` for the server to apply it: without a split the server would answer them with
   the newest version, the candidate); the `canary` label (registry alias and model-config
   label) moves to the candidate, which needs a passing gate record; the split gives it
   `step_weight` percent;
2. every `interval_s` the checks judge canary against stable on the records of that interval
   only; a failing interval adds one to the failed-check count and holds the weight (as
   Flagger does), a passing one raises it by `step_weight` up to `max_weight`;
3. the failed-check count reaching `threshold` rolls back: weight 0, the canary label removed;
   an interval that passes at `max_weight` promotes: `production` moves to the candidate, the
   canary weight goes back to 0 and the canary label is removed.

A good candidate is therefore promoted after max_weight / step_weight intervals, a failing one
rolled back after `threshold` intervals. Every decision is recorded before it is acted on (the
registry audit log, and the report `on_update` writes). Whatever stops the loop early (an
exception, Ctrl-C, `max_intervals`) rolls back too, so no half-finished canary is left routed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from mlops import canary_checks, canary_traffic
from mlops.canary_checks import Thresholds


class CanaryError(ValueError):
  """Bad canary input; the CLI prints `error: <message>` and exits 1."""


@dataclasses.dataclass(frozen=True)
class CanarySpec:
  """What to canary and how (Flagger's defaults: step 10, max 50, interval 60 s, threshold 5)."""

  name: str
  candidate: int
  step_weight: int = 10
  max_weight: int = 50
  interval_s: float = 60.0
  threshold: int = 5
  max_intervals: int | None = None
  stable_label: str = "production"
  canary_label: str = "canary"
  split_key: str = "x-user-id"
  # Seconds between writing weight 0 and moving the canary label (loading the candidate at the
  # start, removing the label at the end), so the server has applied the split first (it polls
  # the traffic file every second by default).
  settle_s: float = 2.0
  thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)

  def validate(self) -> None:
    """Raises CanaryError naming the first bad value and the fix."""
    if not 0 < self.step_weight <= self.max_weight <= 100:
      raise CanaryError(
        f"--step_weight={self.step_weight} --max_weight={self.max_weight}: need "
        "0 < step_weight <= max_weight <= 100 (percent)"
      )
    if not self.interval_s > 0:
      raise CanaryError(f"--interval_s={self.interval_s} must be > 0 (seconds)")
    if self.threshold < 1:
      raise CanaryError(f"--threshold={self.threshold} must be >= 1 (failed checks)")
    if self.thresholds.min_requests < 0:
      raise CanaryError(f"--min_requests={self.thresholds.min_requests} must be >= 0")
    if self.max_intervals is not None and self.max_intervals < 1:
      raise CanaryError(f"--max_intervals={self.max_intervals} must be >= 1")
    if self.stable_label == self.canary_label:
      raise CanaryError(f"--stable_label={self.stable_label} must differ from the canary label")
    if self.settle_s < 0:
      raise CanaryError(f"--settle_s={self.settle_s} must be >= 0")


class Rollout(Protocol):
  """What the controller needs from the registry (mlops/canary_registry.py has the real one)."""

  def point_canary(self, version: int) -> None: ...

  def remove_canary(self) -> None: ...

  def promote(self, version: int) -> None: ...

  def audit(self, record: dict) -> None: ...


@dataclasses.dataclass
class Interval:
  number: int
  start: float  # window, seconds since the epoch
  end: float
  weight: int  # canary weight during the window
  checks: list[dict]
  passed: bool
  failed_checks: int  # the count after this interval
  action: str  # advance | hold | promote | rollback
  next_weight: int


@dataclasses.dataclass
class Outcome:
  spec: CanarySpec
  run_id: str
  started: float
  result: str = "running"  # running | promoted | rolled_back
  reason: str = ""
  intervals: list[Interval] = dataclasses.field(default_factory=list)
  weights: list[int] = dataclasses.field(default_factory=list)  # every weight written, in order
  ended: float | None = None


# (window start, window end), seconds since the epoch -> the window's checks.
Measure = Callable[[float, float], list[dict]]


def _decide(spec: CanarySpec, passed: bool, failed: int, weight: int) -> tuple[str, int]:
  if failed >= spec.threshold:
    return "rollback", 0
  if not passed:
    return "hold", weight
  if weight >= spec.max_weight:
    return "promote", 0
  return "advance", min(weight + spec.step_weight, spec.max_weight)


class Controller:
  """One canary run. `clock` (seconds) and `sleep` are injectable so tests drive it on a fake
  clock; `on_update(outcome)` is called after every decision (the report writer)."""

  def __init__(
    self,
    spec: CanarySpec,
    rollout: Rollout,
    traffic_file: str,
    measure: Measure,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    on_update: Callable[[Outcome], None] | None = None,
  ):
    spec.validate()
    self.spec, self.rollout, self.traffic_file, self.measure = spec, rollout, traffic_file, measure
    self.clock, self.sleep = clock, sleep
    self.on_update = on_update or (lambda outcome: None)
    self.outcome = Outcome(spec, uuid.uuid4().hex[:12], clock())

  def run(self) -> Outcome:
    """Runs the canary to promotion or rollback. Raises what a step raised, after rolling back
    (the registry's own moves restore their old state when they fail)."""
    spec = self.spec
    # A broken file, or one splitting the model over other arms, fails before anything moves.
    config = canary_traffic.read(self.traffic_file)
    canary_traffic.check_free(
      config, self.traffic_file, spec.name, spec.stable_label, spec.canary_label
    )
    # Pin unlabelled requests to stable before the candidate loads: without a split the server
    # answers them with the newest version, which the canary label is about to load.
    self._set_weight(0)
    self.sleep(spec.settle_s)
    self.rollout.point_canary(spec.candidate)
    self._audit({"action": "start", "weight": spec.step_weight})
    try:
      self._set_weight(spec.step_weight)
      self._loop()
    except BaseException as e:
      if self.outcome.result == "running":
        self._finish("rolled_back", f"stopped by {type(e).__name__}: {e}")
      raise
    return self.outcome

  def _loop(self) -> None:
    spec, weight, failed = self.spec, self.spec.step_weight, 0
    window_start = self.clock()
    while True:
      if spec.max_intervals is not None and len(self.outcome.intervals) >= spec.max_intervals:
        self._finish("rolled_back", f"--max_intervals={spec.max_intervals} reached undecided")
        return
      self.sleep(spec.interval_s)
      now = self.clock()
      checks = self.measure(window_start, now)
      passed = canary_checks.passed(checks)
      failed += 0 if passed else 1
      action, next_weight = _decide(spec, passed, failed, weight)
      interval = Interval(
        len(self.outcome.intervals) + 1,
        window_start,
        now,
        weight,
        checks,
        passed,
        failed,
        action,
        next_weight,
      )
      self.outcome.intervals.append(interval)
      self._audit({"action": action, **_interval_fields(interval)})
      window_start = now
      if action == "rollback":
        self._finish("rolled_back", f"{failed} failed checks reached --threshold={spec.threshold}")
        return
      if action == "promote":
        self._finish("promoted", f"every check passed at --max_weight={spec.max_weight}")
        return
      if next_weight != weight:
        self._set_weight(next_weight)
      weight = next_weight
      self.on_update(self.outcome)

  def _finish(self, result: str, reason: str) -> None:
    """Promotes or rolls back: the decision is recorded first, then each move is made."""
    self.outcome.result, self.outcome.reason = result, reason
    self._audit({"action": "promoted" if result == "promoted" else "rolled_back", "reason": reason})
    if result == "promoted":
      self.rollout.promote(self.spec.candidate)
    self._set_weight(0)
    self.sleep(self.spec.settle_s)
    self.rollout.remove_canary()
    self.outcome.ended = self.clock()
    self.on_update(self.outcome)

  def _set_weight(self, weight: int) -> None:
    s = self.spec
    config = canary_traffic.read(self.traffic_file)
    new = canary_traffic.with_weight(
      config, s.name, s.stable_label, s.canary_label, weight, s.split_key
    )
    canary_traffic.write(self.traffic_file, new)
    self.outcome.weights.append(weight)

  def _audit(self, fields: dict) -> None:
    self.rollout.audit(
      {
        "event": "canary",
        "canary_run": self.outcome.run_id,
        "name": self.spec.name,
        "candidate": self.spec.candidate,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        **fields,
      }
    )


def _interval_fields(interval: Interval) -> dict:
  return {
    "interval": interval.number,
    "window": [interval.start, interval.end],
    "weight": interval.weight,
    "next_weight": interval.next_weight,
    "passed": interval.passed,
    "failed_checks": interval.failed_checks,
    "checks": interval.checks,
  }


def log_measure(
  logs_dir: str,
  spec: CanarySpec,
  feedback: str | None = None,
) -> Measure:
  """The measure of a real canary: the window's records from the prediction logs, joined with
  the feedback labels (re-read every interval, as labels keep arriving): `feedback`, else the
  server's `feedback.jsonl` in `logs_dir` when it exists."""
  from mlops import feedback as feedback_files
  from serving.server.log_format import FEEDBACK_FILE

  def measure(start: float, end: float) -> list[dict]:
    arms = (spec.canary_label, spec.stable_label)
    window = canary_checks.read_window(logs_dir, spec.name, arms, int(start * 1e6), int(end * 1e6))
    path = feedback or os.path.join(logs_dir, FEEDBACK_FILE)
    labels = feedback_files.read_feedback(path) if os.path.isfile(path) else None
    return canary_checks.judge(
      window[spec.canary_label], window[spec.stable_label], spec.thresholds, labels
    )

  return measure
