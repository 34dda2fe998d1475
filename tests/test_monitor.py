"""The monitor: drift statistics equal scipy's on exact references; a trained digits model's
logged traffic drifts when its inputs are shifted and not otherwise; windows below the minimum
get no verdict; accuracy alerts with wrong feedback only; the CLI's report, PNGs, one-line
errors and Prometheus gauges."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from scipy import stats

from mlops import drift, monitor, monitor_windows, prediction_log, profile
from tests.helpers import digits_export, model_server

pytest.importorskip("tensorflow", reason="the monitor reads TF Serving logs (make install)")

from tests.helpers import prediction_logs

OPTIONS = drift.DriftOptions()


def _judge(reference: np.ndarray, window: np.ndarray, **options):
  (result,) = drift.group_drift(
    profile.describe(reference[:, None], "x"), window[:, None], drift.DriftOptions(**options)
  )
  return result


def test_statistics_equal_scipy_on_exact_references():
  rng = np.random.default_rng(0)
  reference, window = rng.normal(size=800), rng.normal(0.15, 1.1, size=600)
  result = _judge(reference, window)
  assert result.method == "ks"
  assert result.score == pytest.approx(stats.ks_2samp(reference, window, method="asymp").pvalue)
  result = _judge(reference, window, numeric_method="wasserstein")
  expected = stats.wasserstein_distance(reference, window) / reference.std()
  assert result.score == pytest.approx(expected, rel=1e-3)
  # Integer pixels 0..16 keep their exact table, whatever the number of rows.
  pixels, shifted = rng.integers(0, 17, 5000).astype(float), rng.integers(0, 15, 3000) + 2.0
  result = _judge(pixels, shifted, numeric_method="wasserstein")
  assert result.score == pytest.approx(
    stats.wasserstein_distance(pixels, shifted) / pixels.std(), rel=1e-3
  )
  assert result.drifted
  codes, drifted_codes = rng.integers(0, 4, 900).astype(float), rng.integers(0, 4, 700) * 1.0
  drifted_codes[:100] = 3
  result = _judge(codes, drifted_codes)
  assert result.kind == "categorical" and result.method == "chisquare"
  observed = np.bincount(drifted_codes.astype(int), minlength=4)
  expected = np.bincount(codes.astype(int), minlength=4) * len(drifted_codes) / len(codes)
  assert result.score == pytest.approx(stats.chisquare(observed, expected).pvalue)


def test_large_samples_use_distances_and_unshifted_data_does_not_drift():
  rng = np.random.default_rng(1)
  reference = rng.normal(size=(5000, 3))
  features = profile.describe(reference, "x")
  same = drift.group_drift(features, rng.normal(size=(4000, 3)), OPTIONS)
  assert [r.method for r in same] == ["wasserstein"] * 3 and not any(r.drifted for r in same)
  shifted = rng.normal(size=(4000, 3)) + np.array([0.0, 0.0, 0.5])
  assert [r.drifted for r in drift.group_drift(features, shifted, OPTIONS)] == [0, 0, 1]
  with_nan = shifted.copy()
  with_nan[:400, 0] = np.nan
  first = drift.group_drift(features, with_nan, OPTIONS)[0]
  assert first.nan_share == 0.1 and first.window_rows == 4000 and not first.drifted


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  return digits_export.digits_export(tmp_path_factory)


@pytest.fixture(scope="module")
def logs(saved_model, tmp_path_factory):
  """Logs of the test split as served, then (an hour later) of the same rows shifted."""
  from configs import digits_cnn
  from trainer.data import load_dataset

  dataset = load_dataset(digits_cnn.get_config("smoke").data)
  rows = dataset.test.inputs.reshape(len(dataset.test), -1)
  labels = dataset.test.labels
  shifted = rows.copy()
  inverted = np.arange(64) % 4 != 0
  shifted[:, inverted] = 16 - shifted[:, inverted]  # three pixels in four inverted
  directory = tmp_path_factory.mktemp("logs")
  start = 1_700_000_000_000_000
  prediction_logs.write_log(
    str(directory / "log-0"),
    rows,
    prediction_logs.served_outputs(saved_model, rows),
    start_us=start,
  )
  prediction_logs.write_log(
    str(directory / "log-1"),
    shifted,
    prediction_logs.served_outputs(saved_model, shifted),
    start_us=start + 3_600_000_000,  # an hour later
    id_prefix="s",
  )
  return str(directory), rows, labels


def test_shifted_traffic_drifts_and_unshifted_does_not(saved_model, logs, tmp_path):
  directory, rows, _ = logs
  options = monitor_windows.MonitorOptions(window_s=3600)
  run = monitor.run_monitor(saved_model, directory, options, output_dir=str(tmp_path))
  first, second = run.windows
  assert first.rows == second.rows == len(rows)
  assert first.judged and not first.dataset_drift and first.drift_share < 0.2
  assert not first.prediction_drift and not first.quality_alerts
  assert second.dataset_drift and second.drift_share >= 0.5 and second.prediction_drift
  # Inverted always-blank pixels now read 16: outside the training range.
  assert any("outside the training range" in alert for alert in second.quality_alerts)
  record = json.loads((tmp_path / "monitor.json").read_text())
  assert [w["dataset_drift"] for w in record["windows"]] == [False, True]
  report = (tmp_path / "report.md").read_text()
  assert "drifted_features.png" in report and "drift_over_time.png" in report
  assert os.path.getsize(tmp_path / "drifted_features.png") > 10_000


def test_classify_traffic_is_judged_with_rpc_classify(saved_model, logs, tmp_path):
  """The module's Predict traffic again as one-example Classifies: the same verdicts."""
  directory, _, _ = logs
  predict = prediction_log.read_logs(directory)
  records = []
  for i, (row, scores) in enumerate(
    zip(predict.inputs["inputs"], predict.outputs["probabilities"], strict=True)
  ):
    meta = prediction_log.RecordMetadata(
      f"c{i}", int(predict.time_us[i]), "digits", 1, rpc="Classify"
    )
    records.append(prediction_logs.classify_record(row[None], meta, scores[None]))
  classify_logs = tmp_path / "classify"
  classify_logs.mkdir()
  prediction_log.write_records(str(classify_logs / "log"), records)
  options = monitor_windows.MonitorOptions(window_s=3600)
  run = monitor.run_monitor(
    saved_model, str(classify_logs), options, output_dir=str(tmp_path / "m"), rpc="Classify"
  )
  first, second = run.windows  # Unshifted, then shifted an hour later.
  assert first.judged and not first.dataset_drift and not first.prediction_drift
  assert second.dataset_drift and second.prediction_drift
  assert run.record["read"]["rpc"] == "Classify" and run.record["read"]["rows"] == len(records)
  with pytest.raises(monitor.MonitorError, match="no record fits"):  # Read as Predict: none.
    monitor.run_monitor(saved_model, str(classify_logs), options, output_dir=str(tmp_path / "p"))


def test_small_windows_get_no_verdict(saved_model, logs, tmp_path):
  directory, rows, _ = logs
  options = monitor_windows.MonitorOptions(window_rows=250, min_window_rows=100)
  windows = monitor.run_monitor(saved_model, directory, options, output_dir=str(tmp_path)).windows
  sizes = [w.rows for w in windows]
  assert sum(sizes) == 2 * len(rows) and sizes[0] == 250
  small = [w for w in windows if w.rows < 100]
  assert small and all(not w.judged and "no verdict" in w.note for w in small)
  assert all(w.judged for w in windows if w.rows >= 100)


def test_accuracy_alerts_on_wrong_feedback_only(saved_model, logs, tmp_path):
  directory, _, labels = logs
  baseline = profile.read_profile(saved_model)["model"]["heldout_accuracy"]
  options = monitor_windows.MonitorOptions(window_s=3600)
  right = tmp_path / "right.csv"
  right.write_text(
    "request_id,label\n" + "".join(f"r{i},{y}\n" for i, y in enumerate(labels)) + "gone,1\n"
  )
  run = monitor.run_monitor(
    saved_model, directory, options, output_dir=str(tmp_path / "a"), feedback=str(right)
  )
  accuracy = run.windows[0].accuracy
  assert accuracy.labeled_rows == len(labels) and accuracy.accuracy == pytest.approx(baseline)
  assert accuracy.ci_low < baseline < accuracy.ci_high and not accuracy.alert
  assert run.record["read"]["feedback"]["unknown_ids"] == 1
  wrong = tmp_path / "wrong.csv"
  wrong.write_text(
    "request_id,label\n" + "".join(f"r{i},{(y + 1) % 10}\n" for i, y in enumerate(labels))
  )
  run = monitor.run_monitor(
    saved_model, directory, options, output_dir=str(tmp_path / "b"), feedback=str(wrong)
  )
  assert run.windows[0].accuracy.alert and run.windows[1].accuracy is not None
  assert run.windows[1].accuracy.labeled_rows == 0 and not run.windows[1].accuracy.alert


def _monitor_cli(*args, **kwargs):
  return subprocess.run(
    [sys.executable, "-m", "mlops.monitor", *args],
    capture_output=True,
    text=True,
    env=model_server.SERVER_ENV,
    timeout=300,
    **kwargs,
  )


def test_cli_errors_are_one_line(saved_model, logs, tmp_path):
  directory, _, _ = logs
  cases = {
    "--window=soon": [f"--saved_model={saved_model}", f"--logs={directory}", "--window=soon"],
    "profile.json": [f"--saved_model={tmp_path}", f"--logs={directory}"],
    "not a registered model": ["--name=digits", "--alias=production", f"--logs={directory}"],
  }
  (tmp_path / "saved_model.pb").write_bytes(b"")  # a SavedModel without a profile
  for expected, args in cases.items():
    done = _monitor_cli(*args)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.startswith("error: ") and expected in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
  other = tmp_path / "other_logs"
  prediction_logs.write_log(
    str(other / "log"), np.zeros((3, 10), np.float32), {"classes": np.zeros(3, np.int32)}
  )
  done = _monitor_cli(f"--saved_model={saved_model}", f"--logs={other}")
  assert done.returncode == 1 and "no record fits" in done.stderr, done.stderr[-2000:]
  assert "row shape [10] instead of [64]" in done.stderr


def test_cli_writes_the_report_and_serves_gauges(saved_model, logs, tmp_path):
  directory, rows, _ = logs
  port = model_server.free_port()
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "mlops.monitor",
      f"--saved_model={saved_model}",
      f"--logs={directory}",
      "--window=1h",
      f"--output_dir={tmp_path}",
      f"--serve_metrics_port={port}",
    ],
    env=model_server.SERVER_ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline, page = time.monotonic() + 240, ""
    while time.monotonic() < deadline and proc.poll() is None:
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
          page = response.read().decode()
        if "model_monitor_dataset_drift{" in page:
          break
      except OSError:
        pass
      time.sleep(0.5)
    assert f'model_monitor_dataset_drift{{model="{saved_model}"}} 1.0' in page, page[-2000:]
    assert "model_monitor_feature_drift_score{" in page
  finally:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  assert f"window 1: {len(rows)} rows" in out and "DATASET DRIFT" in out
  assert (tmp_path / "report.md").exists() and (tmp_path / "drift_over_time.png").exists()
