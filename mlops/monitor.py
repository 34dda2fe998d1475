r"""Drift, data-quality and performance monitoring of logged traffic against a model's profile.

  python -m mlops.monitor --saved_model=/models/digits/3 --logs=/logs/digits \
      [--window=1h | --window_requests=5000] [--feedback=labels.csv] [--output_dir=DIR] \
      [--serve_metrics_port=9108 [--every_s=60]]

Reads the prediction logs (mlops/prediction_log.py's format), splits them into windows, and judges
each against the export's reference profile (`assets.extra/profile.json`, mlops/profile.py):
per-feature drift (mlops/drift.py: KS / chi-square on small samples, normalized Wasserstein /
Jensen-Shannon on large ones, PSI for all), prediction drift, data quality, and accuracy on rows
with feedback labels. Writes `monitor.json`, `report.md` and PNGs to --output_dir, prints one
summary line per window, and with --serve_metrics_port serves the latest window's values as
Prometheus gauges on 127.0.0.1 (re-reading the logs every --every_s) until SIGTERM.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
import threading

from absl import app, flags, logging

from mlops import drift, monitor_report, monitor_windows, prediction_log
from mlops import profile as profile_lib

FLAGS = flags.FLAGS
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class MonitorError(ValueError):
  """Bad flags or inputs; printed as one line."""


def parse_duration(text: str) -> float:
  match = _DURATION.match(text.strip())
  if not match or float(match[1]) <= 0:
    raise MonitorError(f"--window={text} is not a duration; use e.g. 30s, 15m, 1h or 1d")
  return float(match[1]) * _UNITS[match[2]]


def resolve_export(saved_model, name, version, alias) -> str:
  """The export directory to judge against: --saved_model, or --name with --version or
  --alias through the MLflow model registry."""
  if saved_model:
    if not os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
      raise MonitorError(f"--saved_model={saved_model} is not a SavedModel directory")
    return saved_model
  if name:
    if version and alias:
      raise MonitorError("give --version or --alias, not both")
    reference = f"{name}@{alias}" if alias else f"{name}/{version}" if version else name
    return profile_lib.resolve_registered(reference)[0]
  raise MonitorError("give --saved_model=BASE/VERSION or --name with --version/--alias")


def options_from_flags() -> monitor_windows.MonitorOptions:
  thresholds = dict(drift.DEFAULT_THRESHOLDS)
  for item in FLAGS.threshold:
    method, _, value = item.partition("=")
    if method not in thresholds:
      raise MonitorError(f"--threshold={item}: unknown method; choose from {sorted(thresholds)}")
    try:
      thresholds[method] = float(value)
    except ValueError as e:
      raise MonitorError(f"--threshold={item}: {value!r} is not a number") from e
  if FLAGS.window and FLAGS.window_requests:
    raise MonitorError("give --window or --window_requests, not both")
  if FLAGS.window_requests is not None and FLAGS.window_requests < 1:
    raise MonitorError(f"--window_requests={FLAGS.window_requests} must be positive")
  return monitor_windows.MonitorOptions(
    drift=drift.DriftOptions(
      numeric_method=FLAGS.numeric_method,
      categorical_method=FLAGS.categorical_method,
      thresholds=thresholds,
      small_sample_max=FLAGS.small_sample_max,
      drift_share=FLAGS.drift_share,
    ),
    window_s=parse_duration(FLAGS.window) if FLAGS.window else None,
    window_rows=FLAGS.window_requests,
    min_window_rows=FLAGS.min_window_rows,
    min_labeled_rows=FLAGS.min_labeled_rows,
    max_accuracy_drop=FLAGS.max_accuracy_drop,
    accuracy_threshold=FLAGS.accuracy_threshold,
    max_quality_share=FLAGS.max_quality_share,
  )


@dataclasses.dataclass(frozen=True)
class MonitorRun:
  record: dict
  windows: list
  report_path: str


def _read(saved_model: str, profile: dict, logs_dir: str, name, all_versions: bool, rpc: str):
  spec = profile["input"]
  schema = {spec["name"]: (spec["dtype"], tuple(spec["row_shape"]))}
  logs = prediction_log.read_logs(logs_dir, model_name=name, input_schema=schema, rpc=rpc)
  if logs.num_records == 0:
    raise MonitorError(f"--logs={logs_dir} holds no complete record")
  if len(logs) == 0:
    reasons = {**logs.schema_breaks, **{f"status {k}": v for k, v in logs.error_records.items()}}
    if logs.other_model_records == logs.num_records:
      raise MonitorError(f"--logs={logs_dir}: all {logs.num_records} records are of other models")
    raise MonitorError(
      f"--logs={logs_dir}: no record fits {saved_model}'s input "
      f"({spec['name']}: {spec['dtype']} {spec['row_shape']}); {reasons}"
    )
  version = os.path.basename(os.path.normpath(saved_model))
  other = logs.other_model_records + logs.other_rpc_records
  if not all_versions and version.isdigit() and (logs.version > 0).any():
    keep = (logs.version == int(version)) | (logs.version == 0)
    other += int((~keep).sum())
    logs = logs.select(keep)
  return logs, other


def run_monitor(
  saved_model: str,
  logs_dir: str,
  options: monitor_windows.MonitorOptions,
  *,
  output_dir: str,
  name: str | None = None,
  feedback: str | None = None,
  all_versions: bool = False,
  rpc: str = "Predict",
) -> MonitorRun:
  """Judges the logs in `logs_dir` of `rpc` (prediction_log.read_logs) against the export's
  profile; writes monitor.json, report.md and PNGs into `output_dir`. Raises MonitorError,
  ProfileError or LogError."""
  profile = profile_lib.read_profile(saved_model)
  logs, other = _read(saved_model, profile, logs_dir, name, all_versions, rpc)
  labels, feedback_info = None, None
  if feedback:
    joined = prediction_log.join_feedback(logs, prediction_log.read_feedback(feedback))
    labels = joined.labels
    feedback_info = {
      "path": feedback,
      "entries": joined.num_feedback,
      "matched": joined.matched,
      "unknown_ids": joined.unknown_ids,
    }
  windows = monitor_windows.judge_windows(profile, logs, labels, options)
  read = {
    "logs": logs_dir,
    "records": logs.num_records,
    "rows": len(logs),
    "torn_records": logs.torn_records,
    "error_records": logs.error_records,
    "schema_breaks": logs.schema_breaks,
    "other_records": other,
    "rpc": rpc,
    "feedback": feedback_info,
  }
  model = {"name": name, "saved_model": saved_model, "kind": profile["model"]["kind"]}
  record = monitor_report.to_record(model, read, windows, options)
  os.makedirs(output_dir, exist_ok=True)
  monitor_report.write_json(os.path.join(output_dir, "monitor.json"), record)
  images = _plots(output_dir, profile, logs, windows, options)
  report = os.path.join(output_dir, "report.md")
  with open(report, "w") as f:
    f.write(monitor_report.markdown(record, windows, images))
  return MonitorRun(record, windows, report)


def _plots(output_dir, profile, logs, windows, options) -> dict[str, str]:
  images = {}
  latest = next((w for w in reversed(windows) if w.judged), None)
  if latest is None:
    return images
  order = logs.time_us.argsort(kind="stable")
  bounds = monitor_windows.window_bounds(logs.time_us[order], options)[latest.index]
  rows = order[bounds[0] : bounds[1]]
  groups = profile_lib.input_groups(
    profile["model"]["kind"],
    logs.inputs[profile["input"]["name"]][rows],
    profile["model"]["pad_id"],
  )
  images["most drifted features"] = os.path.join(output_dir, "drifted_features.png")
  monitor_report.plot_histograms(images["most drifted features"], profile, latest, groups)
  images["drift over time"] = os.path.join(output_dir, "drift_over_time.png")
  monitor_report.plot_over_time(images["drift over time"], windows, options.drift.drift_share)
  return images


def _summary(window) -> str:
  if not window.judged:
    return f"window {window.index}: {window.rows} rows: {window.note}"
  parts = [
    f"window {window.index}: {window.rows} rows",
    f"drift share {window.drift_share:.2f} ({'DATASET DRIFT' if window.dataset_drift else 'ok'})",
    f"prediction drift {'yes' if window.prediction_drift else 'no'}",
    f"quality alerts {len(window.quality_alerts)}",
  ]
  if window.accuracy:
    parts.append(("ACCURACY ALERT: " if window.accuracy.alert else "") + window.accuracy.note)
  return "; ".join(parts)


def _serve(run_once, port: int, every_s: float | None, model: str) -> None:
  from prometheus_client import CollectorRegistry, start_http_server

  registry = CollectorRegistry()
  gauges = monitor_report.make_gauges(registry)
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  signal.signal(signal.SIGINT, lambda *_: stop.set())
  server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
  logging.info("Serving monitor gauges on 127.0.0.1:%d/metrics", port)
  try:
    while True:
      try:
        result = run_once()
        monitor_report.set_gauges(gauges, model, result.windows, result.record["read"])
      except (MonitorError, profile_lib.ProfileError, prediction_log.LogError) as e:
        logging.error("Monitor run failed (gauges keep their last values): %s", e)
      if stop.wait(every_s if every_s else None):
        break
  finally:
    server.shutdown()
    thread.join(timeout=5)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    saved_model = resolve_export(FLAGS.saved_model, FLAGS.name, FLAGS.version, FLAGS.alias)
    if not FLAGS.logs:
      raise MonitorError("--logs=DIR (the prediction log directory) is required")
    options = options_from_flags()
    output_dir = FLAGS.output_dir or os.path.join(FLAGS.logs, "monitor")

    def run_once() -> MonitorRun:
      return run_monitor(
        saved_model,
        FLAGS.logs,
        options,
        output_dir=output_dir,
        name=FLAGS.name,
        feedback=FLAGS.feedback,
        all_versions=FLAGS.all_versions,
        rpc=FLAGS.rpc,
      )

    result = run_once()
  except (MonitorError, profile_lib.ProfileError, prediction_log.LogError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for window in result.windows:
    print(_summary(window))
  print(f"report: {result.report_path}")
  if FLAGS.serve_metrics_port:
    model = FLAGS.name or saved_model
    _serve(
      lambda: result if not FLAGS.every_s else run_once(),
      FLAGS.serve_metrics_port,
      FLAGS.every_s,
      model,
    )


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program: the library is imported by processes
  (tests, the exporter's users) whose own flags share these names."""
  flags.DEFINE_string("saved_model", None, "The export (BASE/VERSION) being served.")
  flags.DEFINE_string("name", None, "Registered model name (needs the MLflow registry).")
  flags.DEFINE_integer("version", None, "Registered version (with --name).")
  flags.DEFINE_string("alias", None, "Registry alias, e.g. production (with --name).")
  flags.DEFINE_string("logs", None, "Directory of prediction log files.")
  flags.DEFINE_string("feedback", None, "CSV/JSONL of request_id,label[,row].")
  flags.DEFINE_string("window", None, "Window duration: 30s, 15m, 1h, 1d.")
  flags.DEFINE_integer("window_requests", None, "Rows per window.")
  flags.DEFINE_integer("min_window_rows", 100, "Below this a window is not judged.")
  flags.DEFINE_integer("min_labeled_rows", 30, "Below this no accuracy verdict.")
  flags.DEFINE_enum(
    "numeric_method", "auto", ["auto", "ks", "wasserstein", "psi", "jensenshannon"], "Numeric test."
  )
  flags.DEFINE_enum(
    "categorical_method", "auto", ["auto", "chisquare", "jensenshannon", "psi"], "Categorical test."
  )
  flags.DEFINE_list(
    "threshold", [], "method=value overrides, e.g. ks=0.01,wasserstein=0.2 (p-values for tests)."
  )
  flags.DEFINE_integer(
    "small_sample_max", 1000, "Tests up to this many rows (the smaller sample), distances above."
  )
  flags.DEFINE_float("drift_share", 0.5, "Dataset drift at this share of features.")
  flags.DEFINE_float("max_accuracy_drop", 0.05, "Alert below test accuracy - this.")
  flags.DEFINE_float("accuracy_threshold", None, "Absolute accuracy alert level.")
  flags.DEFINE_float("max_quality_share", 0.01, "Non-finite/out-of-range share alert.")
  flags.DEFINE_bool("all_versions", False, "Judge rows of every version logged.")
  flags.DEFINE_enum("rpc", "Predict", list(prediction_log.RPCS), "Judge the records of this RPC.")
  flags.DEFINE_string("output_dir", None, "Report directory; default LOGS/monitor.")
  flags.DEFINE_integer("serve_metrics_port", None, "Serve Prometheus gauges on 127.0.0.1.")
  flags.DEFINE_float("every_s", None, "With --serve_metrics_port: re-judge this often.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
