"""`watch`: the monitor every interval; a retrain (`run`) when the guards let an alert through.

Each iteration judges the logs against the profile of the version `production` names now
(mlops/monitor.py, in-process), turns the windows into an Observation (alert kinds per judged
window: `drift` = dataset drift, `prediction_drift`, `accuracy`; and the count of rows with
feedback labels), asks `pipeline_guards.decide`, appends the decision to `<root>/watch.jsonl`
(the record, before the action) and, when it says so, runs the pipeline with the trigger in its
record. The guard state lives in `--state_file` (JSON, atomic writes), so a restarted watcher,
or a CronJob running one iteration per schedule, keeps its persistence, cooldown and caps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable

from absl import logging

from mlops import pipeline_guards, pipeline_run
from mlops.pipeline_guards import Observation


@dataclasses.dataclass(frozen=True)
class WatchOptions:
  name: str
  logs: str
  every_s: float
  state_file: str
  policy: pipeline_guards.Policy
  feedback: str | None = None
  max_iterations: int | None = None
  window_requests: int | None = 500
  min_window_rows: int = 100
  rpc: str = "Predict"  # The RPC whose logged traffic is judged (prediction_log.RPCS).


def window_alerts(windows) -> tuple[tuple[str, ...], ...]:
  """Alert kinds of each judged window (mlops.monitor_windows.WindowResult), oldest first."""
  alerts = []
  for window in windows:
    if not window.judged:
      continue
    kinds = []
    if window.dataset_drift:
      kinds.append("drift")
    if window.prediction_drift:
      kinds.append("prediction_drift")
    if window.accuracy is not None and window.accuracy.alert:
      kinds.append("accuracy")
    alerts.append(tuple(kinds))
  return tuple(alerts)


def observe_with_monitor(options: WatchOptions) -> Observation:
  """One monitor pass over the logs against `production`'s profile. Raises the monitor's
  errors (MonitorError, ProfileError, LogError)."""
  from mlops import monitor, monitor_windows

  export = monitor.resolve_export(None, options.name, None, pipeline_run.PRODUCTION)
  run = monitor.run_monitor(
    export,
    options.logs,
    monitor_windows.MonitorOptions(
      window_rows=options.window_requests, min_window_rows=options.min_window_rows
    ),
    output_dir=os.path.join(os.path.dirname(os.path.abspath(options.state_file)), "monitor"),
    name=options.name,
    feedback=options.feedback,
    rpc=options.rpc,
  )
  feedback = run.record["read"].get("feedback") or {}
  return Observation(window_alerts(run.windows), int(feedback.get("matched", 0)))


def check_inputs(options: WatchOptions) -> None:
  """Raises PipelineError for a missing logs directory, a non-positive interval or a model
  without a `production` version (the monitor has nothing to compare with)."""
  if not os.path.isdir(options.logs):
    raise pipeline_run.PipelineError(
      f"--logs={options.logs} is not a directory; point it at the model server's prediction logs"
    )
  if options.every_s <= 0:
    raise pipeline_run.PipelineError(f"--every_s={options.every_s} must be positive")
  options.policy.check()
  from mlops import profile

  try:
    profile.resolve_registered(f"{options.name}@{pipeline_run.PRODUCTION}")
  except profile.ProfileError as e:
    raise pipeline_run.PipelineError(str(e)) from e


def watch(
  options: WatchOptions,
  run_options: pipeline_run.RunOptions,
  *,
  observe: Callable[[WatchOptions], Observation] = observe_with_monitor,
  run: Callable[[pipeline_run.RunOptions], pipeline_run.PipelineResult] = (
    pipeline_run.run_pipeline
  ),
  clock: Callable[[], float] = time.time,
  stop: threading.Event | None = None,
  report: Callable[[str], None] = logging.info,
) -> pipeline_guards.State:
  """Iterates until `stop` is set or `max_iterations` ran; returns the final guard state.
  `observe`, `run` and `clock` are the monitor, the pipeline and the time (tests pass fakes).
  A monitor error or a held pipeline lock skips the iteration (reported), it does not end the
  watch. Raises GuardError for an unreadable state file."""
  from mlops import monitor, prediction_log, profile

  stop = stop or threading.Event()
  state = pipeline_guards.read_state(options.state_file)
  iteration = 0
  while options.max_iterations is None or iteration < options.max_iterations:
    iteration += 1
    now = clock()
    try:
      seen = observe(options)
    except (monitor.MonitorError, profile.ProfileError, prediction_log.LogError) as e:
      report(f"iteration {iteration}: monitor: {e}")
      seen = None
    if seen is not None:
      decision = pipeline_guards.decide(options.policy, state, seen, now)
      _append_event(options, now, seen, decision)
      report(
        f"iteration {iteration}: {'RETRAIN' if decision.retrain else 'wait'}: {decision.reason}"
      )
      if decision.retrain:
        state = _retrain(options, run_options, run, state, seen, now, decision, report)
        pipeline_guards.write_state(options.state_file, state)
    if options.max_iterations is not None and iteration >= options.max_iterations:
      break
    if stop.wait(options.every_s):
      break
  return state


def _retrain(options, run_options, run, state, seen, now, decision, report):
  trigger = {
    "kind": "watch",
    "alerts": decision.alerts,
    "reason": decision.reason,
    "labelled_rows": seen.labelled_rows,
    "logs": os.path.abspath(options.logs),
  }
  try:
    result = run(dataclasses.replace(run_options, trigger=trigger))
  except pipeline_guards.GuardError as e:  # Another pipeline runs: not a retrain of ours.
    report(f"retrain skipped: {e}")
    return state
  except pipeline_run.PipelineError as e:
    report(f"retrain failed before it started: {e}")
    return pipeline_guards.record_outcome(state, seen, now, "failed")
  report(f"retrain {result.outcome}: {result.message} (MLflow run {result.mlflow_run_id})")
  return pipeline_guards.record_outcome(state, seen, now, result.outcome)


def _append_event(options: WatchOptions, now: float, seen: Observation, decision) -> None:
  path = os.path.join(os.path.dirname(os.path.abspath(options.state_file)), "watch.jsonl")
  event = {
    "time": now,
    "trailing_alert_windows": seen.trailing_alerts(),
    "labelled_rows": seen.labelled_rows,
    **dataclasses.asdict(decision),
  }
  with open(path, "a") as f:
    f.write(json.dumps(event) + "\n")
