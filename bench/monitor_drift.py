r"""The monitor on 100,000 logged rows x 64 features, and the same data through Evidently.

  .venv/bin/python bench/monitor_drift.py [--rows=100000] [--evidently_python=/tmp/evid/bin/python]

Generates a reference (training) set and current traffic (64 features: normal, log-normal,
integer 0..16 and 4-valued categorical columns), unshifted and with 32 features shifted by graded
amounts (some near the thresholds, so agreement is tested where it is hard). Times:
- reading the rows back from PredictionLog TFRecords (one request per row, as online traffic);
- judging them (mlops.monitor_windows: the statistics proper, arrays in memory);
- the whole `run_monitor` (read, judge, JSON, markdown and PNGs).
Then runs bench/monitor_evidently.py under --evidently_python (a throwaway venv with
`evidently` and `pandas<3`, never the project's locks) on the same arrays: Evidently's
DataDriftPreset with its defaults, and compares per-feature verdicts and the time of the
statistics (both sides start from arrays in memory). Two regimes: 50,000 reference rows
(distances: normalized Wasserstein, Jensen-Shannon) and 1,000 reference and current rows (tests:
KS, chi-square). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

from mlops import monitor, monitor_windows, prediction_log, profile  # noqa: E402

_ROWS = flags.DEFINE_integer("rows", 100_000, "Logged rows (current traffic).")
_REFERENCE_ROWS = flags.DEFINE_integer("reference_rows", 50_000, "Reference (training) rows.")
_EVIDENTLY = flags.DEFINE_string(
  "evidently_python", "/tmp/evid/bin/python", "Python of a venv with evidently and pandas<3."
)
NUM_FEATURES = 64
CATEGORICAL = list(range(60, 64))
NUM_CLASSES = 10


def make_data(rows: int, rng: np.random.Generator, shift: bool) -> np.ndarray:
  """[rows, 64] float32: 0-39 normal, 40-49 log-normal, 50-59 integers 0..16, 60-63 codes 0..3.

  Shifted: features 0-19 move by 0.02..0.4 standard deviations, 40-44 scale by 1.05..1.25, 50-54
  gain +1 on 5..25% of rows, 60-62 move 2..10% of rows to code 3.
  """
  x = np.empty((rows, NUM_FEATURES), np.float32)
  x[:, :40] = rng.normal(size=(rows, 40))
  x[:, 40:50] = rng.lognormal(size=(rows, 10))
  x[:, 50:60] = rng.binomial(16, 0.4, size=(rows, 10))
  x[:, 60:64] = rng.choice(4, size=(rows, 4), p=[0.4, 0.3, 0.2, 0.1])
  if shift:
    x[:, :20] += np.linspace(0.02, 0.4, 20, dtype=np.float32)
    x[:, 40:45] *= np.linspace(1.05, 1.25, 5, dtype=np.float32)
    for j, share in zip(range(50, 55), np.linspace(0.05, 0.25, 5), strict=True):
      x[rng.random(rows) < share, j] += 1
    for j, share in zip(range(60, 63), (0.02, 0.05, 0.10), strict=True):
      x[rng.random(rows) < share, j] = 3
  return x


def linear_model(x: np.ndarray) -> dict[str, np.ndarray]:
  """A fixed random softmax classifier standing in for the served model (outputs to log)."""
  weights = np.random.default_rng(7).normal(size=(NUM_FEATURES, NUM_CLASSES)) / 8
  logits = np.asarray(x, np.float64) @ weights
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  return {"probabilities": probs.astype(np.float32), "classes": probs.argmax(1).astype(np.int32)}


def write_export(directory: str, reference: np.ndarray) -> str:
  """A directory holding only the profile (all the monitor reads of an export)."""
  inputs = profile.ProfileInputs(
    kind="classification",
    input_name="inputs",
    input_dtype="float32",
    row_shape=(NUM_FEATURES,),
    training_inputs=reference,
    eval_inputs=reference[:4096],
    pad_id=None,
    num_classes=NUM_CLASSES,
    checkpoint_step=None,
    eval_metrics={"eval/accuracy": 0.9},
    data_fingerprint=None,
  )
  start = time.perf_counter()
  profile.write_profile_file(directory, profile.build_profile(inputs, linear_model))
  print(f"profile of {len(reference)} rows x {NUM_FEATURES}: {time.perf_counter() - start:.2f} s")
  return directory


def write_logs(directory: str, rows: np.ndarray) -> None:
  outputs = linear_model(rows)
  records = [
    prediction_log.make_record(
      {"inputs": rows[i : i + 1]},
      {k: v[i : i + 1] for k, v in outputs.items()},
      prediction_log.RecordMetadata(f"r{i}", 1_700_000_000_000_000 + i, "bench", 1),
    )
    for i in range(len(rows))
  ]
  os.makedirs(directory, exist_ok=True)
  prediction_log.write_records(os.path.join(directory, "log-0"), records)


def judge(saved_model: str, current: np.ndarray) -> tuple[list[bool], float, list[str]]:
  """Per-feature verdicts on one window of `current`, the seconds the statistics took, and the
  methods used."""
  prof = profile.read_profile(saved_model)
  logs = prediction_log.Logs(
    inputs={"inputs": current},
    outputs=linear_model(current),
    request_id=np.arange(len(current)).astype(str),
    row_in_request=np.zeros(len(current), np.int32),
    time_us=np.arange(len(current), dtype=np.int64),
    model_name=np.full(len(current), "bench"),
    version=np.ones(len(current), np.int64),
    version_label=np.full(len(current), ""),
    arm=np.full(len(current), ""),
    latency_us=np.zeros(len(current), np.int64),
    role=np.full(len(current), "primary"),
  )
  options = monitor_windows.MonitorOptions(min_window_rows=1)
  start = time.perf_counter()
  (window,) = monitor_windows.judge_windows(prof, logs, None, options)
  seconds = time.perf_counter() - start
  return [f.drifted for f in window.features], seconds, [f.method for f in window.features]


def timed_monitor_run(root: str, saved_model: str, current: np.ndarray) -> None:
  logs_dir = os.path.join(root, "logs")
  start = time.perf_counter()
  write_logs(logs_dir, current)
  print(f"wrote {len(current)} log records in {time.perf_counter() - start:.1f} s")
  start = time.perf_counter()
  logs = prediction_log.read_logs(logs_dir)
  read_s = time.perf_counter() - start
  start = time.perf_counter()
  run = monitor.run_monitor(
    saved_model, logs_dir, monitor_windows.MonitorOptions(), output_dir=os.path.join(root, "m")
  )
  total_s = time.perf_counter() - start
  windowed = monitor_windows.MonitorOptions(window_rows=5000)
  start = time.perf_counter()
  windows = monitor_windows.judge_windows(profile.read_profile(saved_model), logs, None, windowed)
  windows_s = time.perf_counter() - start
  print(
    harness.table(
      ["step", "seconds"],
      [
        [f"read {len(logs)} PredictionLog records", f"{read_s:.2f}"],
        ["run_monitor (read + judge + JSON + report + 2 PNGs)", f"{total_s:.2f}"],
        [f"judge {len(windows)} windows of 5000 rows", f"{windows_s:.2f}"],
      ],
    )
  )
  print(f"verdict: dataset drift {run.windows[0].dataset_drift}")


def run_evidently(data_path: str, out_path: str) -> dict | None:
  if not os.path.exists(_EVIDENTLY.value):
    print(f"no Evidently venv at {_EVIDENTLY.value}; skipping the comparison")
    return None
  script = os.path.join(REPO, "bench", "monitor_evidently.py")
  subprocess.run([_EVIDENTLY.value, script, data_path, out_path], check=True)
  with open(out_path) as f:
    return json.load(f)


def main(argv: list[str]) -> None:
  del argv
  harness.print_run_header(harness.load_average(), devices=False)
  rng = np.random.default_rng(0)
  regimes = {
    "large": (_REFERENCE_ROWS.value, _ROWS.value),
    "small": (1000, 1000),
  }
  with tempfile.TemporaryDirectory(prefix="monitor_bench_") as root:
    arrays, ours = {}, {}
    for regime, (n_ref, n_cur) in regimes.items():
      reference = make_data(n_ref, rng, shift=False)
      export = write_export(os.path.join(root, regime), reference)
      arrays[f"{regime}_reference"] = reference
      for case in ("unshifted", "shifted"):
        current = make_data(n_cur, rng, shift=case == "shifted")
        arrays[f"{regime}_{case}"] = current
        ours[f"{regime}_{case}"] = judge(export, current)
        if regime == "large" and case == "shifted":
          timed_monitor_run(os.path.join(root, "run"), export, current)
    data_path = os.path.join(root, "data.npz")
    np.savez(data_path, categorical=np.array(CATEGORICAL), **arrays)
    theirs = run_evidently(data_path, os.path.join(root, "evidently.json"))
  rows = []
  for key, (verdicts, seconds, methods) in ours.items():
    row = [key, f"{sum(verdicts)}/64", f"{seconds:.3f}", sorted(set(methods)).__str__()]
    if theirs:
      other = theirs[key]
      agree = sum(a == b for a, b in zip(verdicts, other["drifted"], strict=True))
      disagree = [j for j in range(64) if verdicts[j] != other["drifted"][j]]
      row += [
        f"{sum(other['drifted'])}/64",
        f"{other['seconds']:.2f}",
        f"{agree}/64 {disagree}",
        f"{other['seconds'] / seconds:.0f}x",
      ]
    rows.append(row)
  header = ["data", "ours: drifted", "ours: s", "methods"]
  if theirs:
    header += ["Evidently: drifted", "Evidently: s", "agreement (disagreeing)", "speed-up"]
  print(harness.table(header, rows))


if __name__ == "__main__":
  app.run(main)
