"""Judging logged traffic window by window against a model version's reference profile.

`judge_windows(profile, logs, labels, options)` splits the rows into windows (by time or by a
count of rows) and judges each: input drift per feature, prediction drift against the eval
split's served outputs, data quality (non-finite and out-of-range shares, schema breaks), and
accuracy on the rows that have feedback labels against the test accuracy the model was exported
with. A window below the minimum size gets no verdict and says why.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
from scipy import stats as scipy_stats

from mlops import drift
from mlops import profile as profile_lib
from mlops.prediction_log import Logs


@dataclasses.dataclass(frozen=True)
class MonitorOptions:
  drift: drift.DriftOptions = dataclasses.field(default_factory=drift.DriftOptions)
  window_s: float | None = None
  window_rows: int | None = None
  min_window_rows: int = 100
  min_labeled_rows: int = 30
  # Accuracy alert: the window's accuracy is below baseline - max_accuracy_drop with confidence
  # `confidence` (the upper end of its Wilson interval is below that threshold).
  max_accuracy_drop: float = 0.05
  accuracy_threshold: float | None = None  # overrides baseline - max_accuracy_drop
  confidence: float = 0.95
  # Data quality alert: a window's non-finite share above the reference's by more than this,
  # or an out-of-range share above it.
  max_quality_share: float = 0.01


@dataclasses.dataclass(frozen=True)
class Accuracy:
  labeled_rows: int
  accuracy: float | None
  ci_low: float | None
  ci_high: float | None
  baseline: float | None
  threshold: float | None
  alert: bool
  note: str


@dataclasses.dataclass(frozen=True)
class WindowResult:
  index: int
  start_us: int
  end_us: int
  rows: int
  judged: bool
  note: str
  features: list[drift.FeatureDrift]
  predictions: list[drift.FeatureDrift]
  drift_share: float | None
  dataset_drift: bool
  prediction_drift: bool
  quality_alerts: list[str]
  accuracy: Accuracy | None

  def top_drifted(self, k: int) -> list[drift.FeatureDrift]:
    """The `k` most drifted features: drifted first, then by how far past the threshold."""

    def severity(f: drift.FeatureDrift) -> float:
      if math.isnan(f.score):
        return math.inf
      if f.method in drift.TESTS:
        return -math.log10(max(f.score, 1e-300)) / -math.log10(f.threshold)
      return f.score / f.threshold

    return sorted(self.features, key=severity, reverse=True)[:k]


def window_bounds(time_us: np.ndarray, options: MonitorOptions) -> list[tuple[int, int]]:
  """[start, end) row ranges of the windows over rows sorted by time."""
  n = len(time_us)
  if options.window_rows:
    size = options.window_rows
    return [(s, min(s + size, n)) for s in range(0, n, size)] or [(0, 0)]
  if options.window_s and n:
    width = int(options.window_s * 1e6)
    bucket = (time_us - time_us[0]) // width
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    edges = [0, *cuts.tolist(), n]
    return list(itertools.pairwise(edges))
  return [(0, n)]


def wilson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
  z = scipy_stats.norm.ppf(0.5 + confidence / 2)
  p = successes / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(center - half, 0.0), min(center + half, 1.0)


def _accuracy(predicted, labels, baseline, options: MonitorOptions) -> Accuracy:
  mask = labels >= 0
  n = int(mask.sum())
  threshold = options.accuracy_threshold
  if threshold is None and baseline is not None:
    threshold = baseline - options.max_accuracy_drop
  if n < options.min_labeled_rows:
    note = f"{n} labeled rows < --min_labeled_rows={options.min_labeled_rows}: no verdict"
    return Accuracy(n, None, None, None, baseline, threshold, False, note)
  correct = int(np.sum(predicted[mask] == labels[mask]))
  low, high = wilson_interval(correct, n, options.confidence)
  alert = threshold is not None and high < threshold
  note = (
    f"accuracy {correct / n:.4f} ({options.confidence:.0%} Wilson CI {low:.4f}-{high:.4f}, "
    f"n={n}) vs threshold {threshold if threshold is None else round(threshold, 4)}"
  )
  return Accuracy(n, correct / n, low, high, baseline, threshold, alert, note)


def _quality_alerts(features: list[drift.FeatureDrift], options: MonitorOptions) -> list[str]:
  alerts = []
  for f in features:
    bad = f.nan_share + f.inf_share - f.reference_nan_share
    if bad > options.max_quality_share:
      alerts.append(f"{f.name}: non-finite share {f.nan_share + f.inf_share:.3f}")
    if f.out_of_range_share > options.max_quality_share:
      alerts.append(f"{f.name}: {f.out_of_range_share:.3f} outside the training range")
  return alerts


def judge_window(
  profile: dict, logs: Logs, labels: np.ndarray | None, index: int, options: MonitorOptions
) -> WindowResult:
  """Judges one window's rows (all of `logs`)."""
  kind = profile["model"]["kind"]
  rows = len(logs)
  start = int(logs.time_us.min()) if rows else 0
  end = int(logs.time_us.max()) if rows else 0
  if rows < options.min_window_rows:
    note = f"{rows} rows < --min_window_rows={options.min_window_rows}: no verdict"
    return WindowResult(index, start, end, rows, False, note, [], [], None, False, False, [], None)
  inputs = logs.inputs[profile["input"]["name"]]
  features = []
  for group, matrix in profile_lib.input_groups(kind, inputs, profile["model"]["pad_id"]).items():
    features += drift.group_drift(profile["groups"][group], matrix, options.drift)
  predictions = []
  try:
    outputs = profile_lib.output_groups(kind, logs.outputs)
  except KeyError:  # Logs of another signature: no prediction distribution to compare.
    outputs = {}
  for group, matrix in outputs.items():
    predictions += drift.group_drift(profile["predictions"][group], matrix, options.drift)
  share = float(np.mean([f.drifted for f in features]))
  accuracy = None
  if labels is not None and kind == "classification" and "classes" in logs.outputs:
    baseline = profile["model"].get("heldout_accuracy")
    if baseline is None:
      baseline = (profile["model"].get("eval_metrics") or {}).get("eval/accuracy")
    accuracy = _accuracy(np.asarray(logs.outputs["classes"]), labels, baseline, options)
  return WindowResult(
    index=index,
    start_us=start,
    end_us=end,
    rows=rows,
    judged=True,
    note="",
    features=features,
    predictions=predictions,
    drift_share=share,
    dataset_drift=share >= options.drift.drift_share,
    prediction_drift=bool(predictions and predictions[0].drifted),
    quality_alerts=_quality_alerts(features, options),
    accuracy=accuracy,
  )


def judge_windows(
  profile: dict, logs: Logs, labels: np.ndarray | None, options: MonitorOptions
) -> list[WindowResult]:
  """Every window of `logs` (rows ordered by time first), oldest first."""
  order = np.argsort(logs.time_us, kind="stable")
  logs = logs.select(order)
  labels = labels[order] if labels is not None else None
  results = []
  for index, (start, end) in enumerate(window_bounds(logs.time_us, options)):
    part = slice(start, end)
    window = logs.select(np.arange(start, end))
    results.append(
      judge_window(profile, window, labels[part] if labels is not None else None, index, options)
    )
  return results
