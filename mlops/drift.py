"""Drift statistics: one window of logged values against a reference profile's features.

Each feature is judged by one method, chosen like Evidently's DataDriftPreset (`auto`): when the
smaller of the two samples (reference rows, window rows) has at most `small_sample_max` (1000)
rows, a test (two-sample Kolmogorov-Smirnov for numeric features, Pearson chi-square for
categorical ones, drift at p < 0.05); above it a distance (Wasserstein distance divided by the
reference's standard deviation for numeric features, Jensen-Shannon distance for categorical
ones, drift at >= 0.1). PSI is computed for every feature as well (drift at >= 0.1 when it is
the method). The dataset drifts when at least `drift_share` (0.5) of the features drift.
Evidently picks by the reference size alone; taking the smaller sample also keeps a test off a
tiny window.

The reference is the profile, not the training rows: features with at most MAX_EXACT_VALUES
distinct values keep their exact value table, features of at most MAX_SAMPLE_ROWS rows keep
the rows (then KS, chi-square and Wasserstein are exact); other
continuous features keep their quantile function at ~210 levels, against which KS and Wasserstein
are computed (interpolated linearly between quantiles). The window is sorted once for all
features; everything else is a few array operations per feature.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats as scipy_stats

TESTS = ("ks", "chisquare")
DISTANCES = ("wasserstein", "jensenshannon", "psi")
METHODS = TESTS + DISTANCES
DEFAULT_THRESHOLDS = {
  "ks": 0.05,
  "chisquare": 0.05,
  "wasserstein": 0.1,
  "jensenshannon": 0.1,
  "psi": 0.1,
}
# Evidently fills empty bins with this share (or a millionth of the smallest non-empty one).
_EMPTY_SHARE = 1e-4


@dataclasses.dataclass(frozen=True)
class DriftOptions:
  numeric_method: str = "auto"  # auto | ks | wasserstein | psi | jensenshannon
  categorical_method: str = "auto"  # auto | chisquare | jensenshannon | psi
  thresholds: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
  small_sample_max: int = 1000
  drift_share: float = 0.5

  def method(self, kind: str, reference_rows: int, window_rows: int) -> str:
    chosen = self.numeric_method if kind == "numeric" else self.categorical_method
    if chosen != "auto":
      return chosen
    small = min(reference_rows, window_rows) <= self.small_sample_max
    if kind == "numeric":
      return "ks" if small else "wasserstein"
    return "chisquare" if small else "jensenshannon"


@dataclasses.dataclass(frozen=True)
class FeatureDrift:
  name: str
  kind: str
  method: str
  # The method's value: a p-value for tests, the distance otherwise.
  score: float
  threshold: float
  drifted: bool
  psi: float
  window_rows: int
  reference_rows: int
  nan_share: float
  inf_share: float
  out_of_range_share: float
  reference_nan_share: float


class _Reference:
  """A feature's reference distribution: an exact value table or a quantile function."""

  def __init__(self, feature: dict):
    self.feature = feature
    self.n = feature["count"]
    table = feature.get("values")
    self.exact = bool(table and table["exact"] and not table["other_count"]) or "sample" in feature
    if self.exact:
      if "sample" in feature:
        values, counts = np.unique(np.asarray(feature["sample"], np.float64), return_counts=True)
      else:
        values, counts = table["values"], table["counts"]
      self.values = np.asarray(values, np.float64)
      counts = np.asarray(counts, np.float64)
      self.probs = counts / max(counts.sum(), 1)
      self.cdf_at_values = np.cumsum(self.probs)
    if "quantiles" in feature:
      self.levels = np.asarray(feature["quantiles"]["levels"], np.float64)
      self.quantiles = np.asarray(feature["quantiles"]["values"], np.float64)

  def cdf(self, x: np.ndarray) -> np.ndarray:
    if self.exact:
      index = np.searchsorted(self.values, x, side="right") - 1
      return np.where(index >= 0, self.cdf_at_values[np.maximum(index, 0)], 0.0)
    return np.interp(x, self.quantiles, self.levels, left=0.0, right=1.0)

  def quantile(self, u: np.ndarray) -> np.ndarray:
    if self.exact:
      index = np.searchsorted(self.cdf_at_values, u, side="left")
      return self.values[np.minimum(index, len(self.values) - 1)]
    return np.interp(u, self.levels, self.quantiles)

  def category_counts(self) -> tuple[np.ndarray, np.ndarray]:
    table = self.feature["values"]
    return np.asarray(table["values"], np.float64), np.asarray(table["counts"], np.float64)


def ks(reference: _Reference, window: np.ndarray) -> tuple[float, float]:
  """(p-value, statistic) of the two-sample KS test; `window` sorted, finite.

  The p-value is scipy's asymptotic two-sample one (ks_2samp(method='asymp'): Kolmogorov's
  distribution at n*m/(n+m)).
  """
  m = len(window)
  if reference.exact:
    support = np.union1d(reference.values, _unique_sorted(window))
    window_cdf = np.searchsorted(window, support, side="right") / m
    statistic = float(np.max(np.abs(reference.cdf(support) - window_cdf)))
  else:
    ref_cdf = reference.cdf(window)
    steps = np.arange(m + 1) / m
    statistic = float(
      max(np.max(np.abs(ref_cdf - steps[1:])), np.max(np.abs(ref_cdf - steps[:-1])))
    )
  effective = round(m * reference.n / (m + reference.n))
  return float(scipy_stats.kstwo.sf(statistic, max(effective, 1))), statistic


def wasserstein(reference: _Reference, window: np.ndarray) -> float:
  """Wasserstein-1 distance / max(reference std, 0.001), as Evidently normalizes it. `window`
  sorted, finite. Exact references: the integral of |F_ref - F_window| over the merged support;
  quantile functions: the mean gap between the two quantile functions at the window's
  midpoints."""
  if reference.exact:
    support = np.union1d(reference.values, _unique_sorted(window))
    window_cdf = np.searchsorted(window, support[:-1], side="right") / len(window)
    distance = float(np.sum(np.abs(reference.cdf(support[:-1]) - window_cdf) * np.diff(support)))
  else:
    u = (np.arange(len(window)) + 0.5) / len(window)
    distance = float(np.mean(np.abs(reference.quantile(u) - window)))
  return distance / max(reference.feature["std"] or 0.0, 0.001)


def _unique_sorted(column: np.ndarray) -> np.ndarray:
  return column[np.concatenate([[True], column[1:] != column[:-1]])] if len(column) else column


def _sorted_counts(column: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """How often each of `keys` occurs in the sorted `column`."""
  return (
    np.searchsorted(column, keys, side="right") - np.searchsorted(column, keys, side="left")
  ).astype(np.float64)


def _sorted_bin_counts(column: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """profile.bin_counts for a sorted column, in O(bins log n)."""
  if len(edges) < 2:
    return np.array([float(len(column))])
  cuts = np.searchsorted(column, edges[1:-1], side="left")
  return np.diff(np.concatenate([[0], cuts, [len(column)]])).astype(np.float64)


def _shares(reference: _Reference, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reference and window shares over categories (value tables) or the profile's bins."""
  feature = reference.feature
  if "bins" in feature and not (feature["kind"] == "categorical" and "values" in feature):
    edges = np.asarray(feature["bins"]["edges"], np.float64)
    ref_counts = np.asarray(feature["bins"]["counts"], np.float64)
    win_counts = _sorted_bin_counts(window, edges)
  else:
    values, ref_counts = reference.category_counts()
    keys = np.union1d(values, _unique_sorted(window))
    ref_full = np.zeros(len(keys))
    ref_full[np.searchsorted(keys, values)] = ref_counts
    win_counts = _sorted_counts(window, keys)
    other = feature["values"]["other_count"]
    ref_counts = np.append(ref_full, other) if other else ref_full
    win_counts = np.append(win_counts, 0.0) if other else win_counts
  return ref_counts / max(ref_counts.sum(), 1), win_counts / max(win_counts.sum(), 1)


def _fill_empty(shares: np.ndarray) -> np.ndarray:
  nonzero = shares[shares > 0]
  floor = nonzero.min() / 1e6 if len(nonzero) and nonzero.min() <= _EMPTY_SHARE else _EMPTY_SHARE
  return np.where(shares == 0, floor, shares)


def psi(reference: _Reference, window: np.ndarray) -> float:
  ref, win = (_fill_empty(s) for s in _shares(reference, window))
  return float(np.sum((win - ref) * np.log(win / ref)))


def jensenshannon(reference: _Reference, window: np.ndarray) -> float:
  from scipy.spatial import distance

  ref, win = (_fill_empty(s) for s in _shares(reference, window))
  return float(distance.jensenshannon(ref, win))


def chisquare(reference: _Reference, window: np.ndarray) -> float:
  """p-value of Pearson's chi-square of the window's category counts against the reference's
  shares (Evidently's test); a category the reference never saw gives p = 0."""
  ref_share, win_share = _shares(reference, window)
  observed = win_share * len(window)
  expected = ref_share * len(window)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(expected > 0, (observed - expected) ** 2 / expected, np.inf * (observed > 0))
  statistic = float(np.nansum(terms))
  dof = max(len(observed) - 1, 1)
  return float(scipy_stats.chi2.sf(statistic, dof)) if np.isfinite(statistic) else 0.0


_SCORERS = {
  "ks": lambda ref, w: ks(ref, w)[0],
  "wasserstein": wasserstein,
  "psi": psi,
  "jensenshannon": jensenshannon,
  "chisquare": chisquare,
}


def group_drift(
  features: list[dict], window: np.ndarray, options: DriftOptions
) -> list[FeatureDrift]:
  """Judges every column of `window` [rows, features] against the profile's `features`."""
  window = np.asarray(window)
  if window.ndim != 2 or window.shape[1] != len(features):
    raise ValueError(f"window has shape {window.shape}, the profile {len(features)} features")
  # One contiguous row per feature (sorting along a strided axis costs twice as much); float32
  # logs stay float32 for the sort.
  dtype = np.float32 if window.dtype == np.float32 else np.float64
  columns = np.array(window.T, dtype=dtype, order="C")
  finite = np.isfinite(columns)
  rows = columns.shape[1]
  if finite.all():
    finite_rows = np.full(len(features), rows)
    nan_share = inf_share = np.zeros(len(features))
  else:
    nan_share, inf_share = np.isnan(columns).mean(1), np.isinf(columns).mean(1)
    finite_rows = finite.sum(1)
    columns[~finite] = np.inf  # non-finite values sort last and are cut off
  columns.sort(axis=1)
  results = []
  for j, feature in enumerate(features):
    column = columns[j, : finite_rows[j]].astype(np.float64)
    reference = _Reference(feature)
    method = options.method(feature["kind"], reference.n, len(column))
    threshold = options.thresholds[method]
    if len(column) == 0:
      score, drifted, psi_value = float("nan"), True, float("nan")
    else:
      score = _SCORERS[method](reference, column)
      drifted = score < threshold if method in TESTS else score >= threshold
      psi_value = score if method == "psi" else psi(reference, column)
    low, high = feature["min"], feature["max"]
    outside = 0.0
    if low is not None and len(column):
      inside = np.searchsorted(column, high, "right") - np.searchsorted(column, low, "left")
      outside = 1.0 - inside / len(column)
    results.append(
      FeatureDrift(
        name=feature["name"],
        kind=feature["kind"],
        method=method,
        score=float(score),
        threshold=threshold,
        drifted=bool(drifted),
        psi=float(psi_value),
        window_rows=len(window),
        reference_rows=reference.n,
        nan_share=float(nan_share[j]),
        inf_share=float(inf_share[j]),
        out_of_range_share=outside,
        reference_nan_share=feature["nan_share"],
      )
    )
  return results
