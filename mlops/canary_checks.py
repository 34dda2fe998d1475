"""The canary's checks: canary arm against stable arm on one window of prediction logs.

Called by the canary controller (mlops/canary.py) once per interval on the records of that
interval only (`read_window`), then `judge`. Each check is a record of what it measured, its
threshold and its verdict (`pass`, `fail`, or `skipped` when it cannot apply), as the gate's
checks are:

* `requests`: OK + error primary records of each arm in the window; fewer than `min_requests`
  on either arm fails the interval, as Flagger fails a check without enough traffic, and the
  other checks are then `skipped` (nothing to judge them on).
* `error_rate`: canary error share minus stable's; fails above `max_error_rate_increase` (0.01:
  Flagger's default success rate of 99%, measured against stable rather than absolute).
* `latency_p99_ratio`: canary p99 / stable p99 of the OK requests' server latency.
* `prediction_divergence`: Jensen-Shannon distance (base 2, 0..1) of the two arms'
  predicted-class histograms. Two samples of one distribution differ by chance (about 0.2 for
  100 rows over 10 classes), so the check fails only when the distance exceeds
  `max_divergence` AND the G-test of homogeneity of the same histograms (G = 2 N JS-divergence,
  chi-square with k-1 degrees of freedom) rejects equality at `divergence_alpha`.
* `accuracy`: with feedback labels, canary accuracy minus stable's on the labelled rows; fails
  below `-max_accuracy_drop`; skipped while either arm has fewer than `min_labels` labels.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mlops import prediction_log


@dataclasses.dataclass(frozen=True)
class Thresholds:
  min_requests: int = 100
  max_error_rate_increase: float = 0.01
  max_latency_ratio: float = 1.5
  max_divergence: float = 0.1
  divergence_alpha: float = 0.001
  max_accuracy_drop: float = 0.05
  min_labels: int = 30


@dataclasses.dataclass
class ArmWindow:
  """One arm's primary records in a window."""

  requests: int = 0
  errors: int = 0
  latency_us: list[int] = dataclasses.field(default_factory=list)  # per OK request
  classes: list[int] = dataclasses.field(default_factory=list)  # predicted class per row
  keys: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (request id, row)


def _classes(outputs, rpc: str = "Predict") -> list[int] | None:
  """Predicted class per row: the `classes` output (first column; a Classify's top-scoring
  label), else the argmax of `probabilities`/`logits`/`scores`, else None (a model without
  classes gets no divergence check)."""
  from serving.server import log_format, tensors

  if rpc == "Classify":
    arrays = {k: tensors.to_ndarray(outputs[k]) for k in ("classes", "scores") if k in outputs}
    top = log_format.top_classes(arrays.get("classes"), arrays.get("scores"))
    return top.tolist() if top is not None and top.dtype == np.int64 else None
  if "classes" in outputs:
    values = tensors.to_ndarray(outputs["classes"])
    return values.reshape(len(values), -1)[:, 0].astype(np.int64).tolist()
  for name in ("probabilities", "logits", "scores"):
    if name in outputs:
      values = tensors.to_ndarray(outputs[name])
      return np.argmax(values.reshape(len(values), -1), axis=1).tolist()
  return None


def read_window(
  logs_dir: str, model: str, arms: tuple[str, ...], start_us: int, end_us: int
) -> dict[str, ArmWindow]:
  """The primary records of `model` whose request started in [start_us, end_us) and that the
  traffic split assigned to one of `arms`, per arm. Shadow copies and requests that named a
  version or label themselves are left out. Files last written before the window are not
  opened. Raises prediction_log.LogError when `logs_dir` is not a directory."""
  from serving.api_protos import prediction_log_pb2

  if not os.path.isdir(logs_dir):
    raise prediction_log.LogError(
      f"--logs={logs_dir} is not a directory; give the prediction log directory"
    )
  window = {arm: ArmWindow() for arm in arms}
  names = sorted(
    n
    for n in os.listdir(logs_dir)
    if not n.startswith(".") and not n.endswith(prediction_log.NOT_LOG_SUFFIXES)
  )
  for name in names:
    path = os.path.join(logs_dir, name)
    if not os.path.isfile(path) or os.path.getmtime(path) * 1e6 < start_us:
      continue
    for payload in prediction_log.iter_records(path):
      try:
        log = prediction_log_pb2.PredictionLog.FromString(payload)
        meta = prediction_log.decode_metadata(log)
      except Exception:  # A record that does not parse is a torn tail; the reader skips it too.
        continue
      if meta.role != "primary" or meta.arm not in window or meta.model_name != model:
        continue
      if not start_us <= meta.time_us < end_us:
        continue
      _add(window[meta.arm], meta, log.predict_log.response.outputs)
  return window


def _add(arm: ArmWindow, meta, outputs) -> None:
  arm.requests += 1
  if meta.status_code != 0:
    arm.errors += 1
    return
  arm.latency_us.append(meta.latency_us)
  classes = _classes(outputs, meta.rpc)
  if classes is not None:
    arm.classes.extend(classes)
    arm.keys.extend((meta.request_id, row) for row in range(len(classes)))


def _check(name: str, measured, threshold: str, verdict: str, detail: str = "") -> dict:
  return {
    "name": name,
    "measured": None if measured is None else float(measured),
    "threshold": threshold,
    "verdict": verdict,
    "detail": detail,
  }


def js_distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """(Jensen-Shannon distance base 2, G-test p-value) of two class-count histograms."""
  from scipy import stats
  from scipy.spatial import distance

  used = (a + b) > 0
  a, b = a[used].astype(np.float64), b[used].astype(np.float64)
  if len(a) < 2:
    return 0.0, 1.0
  js = float(distance.jensenshannon(a / a.sum(), b / b.sum(), base=2))
  # The G statistic of the 2 x k table equals 2 N times the weighted JS divergence (nats).
  _, p_value, _, _ = stats.chi2_contingency(np.stack([a, b]), lambda_="log-likelihood")
  return js, float(p_value)


def _divergence(canary: ArmWindow, stable: ArmWindow, t: Thresholds) -> dict:
  name = "prediction_divergence"
  if not canary.classes or not stable.classes:
    return _check(name, None, f"<= {t.max_divergence}", "skipped", "no class output logged")
  size = max(max(canary.classes), max(stable.classes)) + 1
  counts_c = np.bincount(np.asarray(canary.classes), minlength=size)
  counts_s = np.bincount(np.asarray(stable.classes), minlength=size)
  js, p_value = js_distance(counts_c, counts_s)
  failed = js > t.max_divergence and p_value < t.divergence_alpha
  detail = (
    f"Jensen-Shannon distance of predicted classes; G-test p={p_value:.3g} "
    f"(fails only if p < {t.divergence_alpha}); rows {len(canary.classes)} vs {len(stable.classes)}"
  )
  return _check(name, js, f"<= {t.max_divergence}", "fail" if failed else "pass", detail)


def _accuracy(canary: ArmWindow, stable: ArmWindow, labels, t: Thresholds) -> dict:
  name, threshold = "accuracy", f">= -{t.max_accuracy_drop}"
  if not labels:
    return _check(name, None, threshold, "skipped", "no feedback labels")
  scores = []
  for arm in (canary, stable):
    pairs = [(c, labels[k]) for c, k in zip(arm.classes, arm.keys, strict=True) if k in labels]
    scores.append((sum(c == y for c, y in pairs), len(pairs)))
  (hit_c, n_c), (hit_s, n_s) = scores
  if min(n_c, n_s) < t.min_labels:
    return _check(
      name, None, threshold, "skipped", f"labelled rows {n_c} vs {n_s} < {t.min_labels}"
    )
  delta = hit_c / n_c - hit_s / n_s
  detail = f"canary {hit_c / n_c:.4f} on {n_c} labelled rows, stable {hit_s / n_s:.4f} on {n_s}"
  return _check(name, delta, threshold, "pass" if delta >= -t.max_accuracy_drop else "fail", detail)


def judge(
  canary: ArmWindow,
  stable: ArmWindow,
  thresholds: Thresholds,
  labels: dict[tuple[str, int], int] | None = None,
) -> list[dict]:
  """The checks of one window (see the module docstring), `requests` first. The window passes
  when no check failed."""
  t = thresholds
  fewest = min(canary.requests, stable.requests)
  counts = f"canary {canary.requests}, stable {stable.requests} requests"
  checks = [
    _check(
      "requests",
      fewest,
      f">= {t.min_requests}",
      "pass" if fewest >= t.min_requests else "fail",
      counts,
    )
  ]
  names = ("error_rate", "latency_p99_ratio", "prediction_divergence", "accuracy")
  if fewest < t.min_requests or not canary.requests or not stable.requests:
    return checks + [_check(n, None, "", "skipped", "too few requests") for n in names]
  rate_c, rate_s = canary.errors / canary.requests, stable.errors / stable.requests
  increase = rate_c - rate_s
  checks.append(
    _check(
      "error_rate",
      increase,
      f"<= {t.max_error_rate_increase}",
      "pass" if increase <= t.max_error_rate_increase else "fail",
      f"canary {rate_c:.4f} ({canary.errors} errors), stable {rate_s:.4f} ({stable.errors})",
    )
  )
  checks.append(_latency(canary, stable, t))
  checks.append(_divergence(canary, stable, t))
  checks.append(_accuracy(canary, stable, labels, t))
  return checks


def _latency(canary: ArmWindow, stable: ArmWindow, t: Thresholds) -> dict:
  name, threshold = "latency_p99_ratio", f"<= {t.max_latency_ratio}"
  if not canary.latency_us or not stable.latency_us:
    # An arm whose every request failed has no latency; the error rate check judges it.
    return _check(name, None, threshold, "skipped", "an arm has no OK request")
  p99_c = float(np.percentile(canary.latency_us, 99))
  p99_s = max(float(np.percentile(stable.latency_us, 99)), 1.0)
  ratio = p99_c / p99_s
  detail = f"p99 canary {p99_c / 1000:.3f} ms, stable {p99_s / 1000:.3f} ms"
  return _check(name, ratio, threshold, "pass" if ratio <= t.max_latency_ratio else "fail", detail)


def passed(checks: list[dict]) -> bool:
  return all(c["verdict"] != "fail" for c in checks)
