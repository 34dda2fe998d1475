"""The statistics of an A/B test on prediction logs (numpy + scipy; no I/O).

* `srm_check`: sample-ratio mismatch, Pearson chi-square of requests per arm against the
  configured weights (flagged at p < 0.001, the usual SRM threshold: a mismatch means the split or
  the logging is broken and no other number of the test can be trusted).
* `proportion_difference`: difference of two proportions (treatment - control), a 95% Wald
  interval (unpooled variances) and the two-sided p-value of the pooled two-proportion z-test.
* `latency_comparison`: p50/p99 per arm and the two-sided Mann-Whitney U test (latencies are
  skewed; a rank test does not assume a distribution).
* `sample_size`: labelled rows per arm needed to detect an absolute change `mde` of a proportion
  (two-sided alpha, power; unequal allocation by the weights' ratio).
* `always_valid`: the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and
  Walsh, "Always valid inference: bringing sequential analysis to A/B testing" (2017): an
  always-valid p-value and confidence sequence for the difference, valid at every look, so the
  report can be read every day without inflating the false-positive rate.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

SRM_ALPHA = 0.001


@dataclasses.dataclass(frozen=True)
class Srm:
  observed: dict[str, int]
  expected: dict[str, float]
  chi2: float
  p_value: float
  flagged: bool


def srm_check(counts: dict[str, int], weights: dict[str, float], alpha: float = SRM_ALPHA) -> Srm:
  """Pearson chi-square of `counts` against `weights` (same keys; weights need not sum to 1).
  Raises ValueError when an arm has no weight or there are no requests."""
  if set(counts) - set(weights):
    raise ValueError(f"arms {sorted(set(counts) - set(weights))} have no configured weight")
  arms = list(weights)
  observed = np.array([counts.get(a, 0) for a in arms], float)
  total = observed.sum()
  if total == 0:
    raise ValueError("no requests in any arm")
  share = np.array([weights[a] for a in arms], float) / sum(weights.values())
  expected = total * share
  chi2, p = stats.chisquare(observed, expected)
  return Srm(
    observed={a: int(o) for a, o in zip(arms, observed, strict=True)},
    expected={a: float(e) for a, e in zip(arms, expected, strict=True)},
    chi2=float(chi2),
    p_value=float(p),
    flagged=bool(p < alpha),
  )


@dataclasses.dataclass(frozen=True)
class Difference:
  control: float
  treatment: float
  difference: float  # treatment - control
  ci_low: float
  ci_high: float
  p_value: float


def proportion_difference(
  successes_a: int, n_a: int, successes_b: int, n_b: int, confidence: float = 0.95
) -> Difference:
  """Treatment (b) minus control (a): Wald interval and pooled z-test p-value. n_a, n_b > 0."""
  pa, pb = successes_a / n_a, successes_b / n_b
  z = stats.norm.ppf(0.5 + confidence / 2)
  se = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
  pooled = (successes_a + successes_b) / (n_a + n_b)
  se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
  p = 2 * stats.norm.sf(abs(pb - pa) / se0) if se0 > 0 else 1.0
  return Difference(pa, pb, pb - pa, pb - pa - z * se, pb - pa + z * se, float(p))


@dataclasses.dataclass(frozen=True)
class Latency:
  p50_ms: dict[str, float]
  p99_ms: dict[str, float]
  p_value: float  # Mann-Whitney U, two-sided, control vs treatment


def latency_comparison(control_us: np.ndarray, treatment_us: np.ndarray, names) -> Latency:
  """Per-arm p50/p99 in ms and the Mann-Whitney U p-value (NaN when an arm has no requests)."""
  p50, p99 = {}, {}
  for name, values in zip(names, (control_us, treatment_us), strict=True):
    has = len(values) > 0
    p50[name] = float(np.percentile(values, 50)) / 1e3 if has else math.nan
    p99[name] = float(np.percentile(values, 99)) / 1e3 if has else math.nan
  p = math.nan
  if len(control_us) and len(treatment_us):
    p = float(stats.mannwhitneyu(control_us, treatment_us, alternative="two-sided").pvalue)
  return Latency(p50, p99, p)


def sample_size(
  p_control: float, mde: float, ratio: float = 1.0, alpha: float = 0.05, power: float = 0.8
) -> tuple[int, int]:
  """(control, treatment) rows needed to detect p_control -> p_control + mde (or - mde when
  that leaves [0, 1]) with a two-sided z-test; `ratio` = treatment rows / control rows."""
  p_treat = p_control + mde if p_control + mde <= 1 else p_control - mde
  z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
  variance = p_control * (1 - p_control) + p_treat * (1 - p_treat) / ratio
  # A proportion of exactly 0 or 1 has no variance; floor it so the plan is not "0 rows".
  variance = max(variance, mde * (1 - mde))
  n_control = math.ceil(z * z * variance / (mde * mde))
  return n_control, math.ceil(n_control * ratio)


@dataclasses.dataclass(frozen=True)
class Sequential:
  """The mSPRT path over labelled rows in time order (arrays of one entry per row)."""

  n: np.ndarray  # rows seen so far (both arms)
  difference: np.ndarray  # running treatment - control
  p_value: np.ndarray  # always-valid p-value (non-increasing)
  ci_low: np.ndarray  # always-valid (1 - alpha) confidence sequence
  ci_high: np.ndarray
  alpha: float
  tau: float
  flagged_at: int | None  # rows seen when the p-value first fell below alpha


def always_valid(
  values: np.ndarray,
  is_treatment: np.ndarray,
  *,
  tau: float,
  alpha: float = 0.05,
  burn_in: int = 30,
) -> Sequential:
  """mSPRT for the difference of means of two streams of 0/1 (or bounded) values in arrival
  order, with a normal mixing distribution N(0, tau^2) over the difference.

  With the estimate d and its variance v (plug-in, per arm), the mixture likelihood ratio is
  sqrt(v / (v + tau^2)) * exp(d^2 tau^2 / (2 v (v + tau^2))); the always-valid p-value is the
  running minimum of 1 / ratio. Before both arms have `burn_in` rows the p-value is 1 (the
  plug-in variance is unreliable there). Proportions in the variance are smoothed as
  (s + 1) / (n + 2) so an arm at 0% or 100% still has a variance.
  """
  values = np.asarray(values, float)
  treat = np.asarray(is_treatment, bool)
  n_b = np.cumsum(treat)
  n_a = np.arange(1, len(values) + 1) - n_b
  s_b = np.cumsum(np.where(treat, values, 0.0))
  s_a = np.cumsum(np.where(treat, 0.0, values))
  with np.errstate(divide="ignore", invalid="ignore"):
    diff = np.where((n_a > 0) & (n_b > 0), s_b / n_b - s_a / np.maximum(n_a, 1), 0.0)
    sm_a, sm_b = (s_a + 1) / (n_a + 2), (s_b + 1) / (n_b + 2)
    v = sm_a * (1 - sm_a) / np.maximum(n_a, 1) + sm_b * (1 - sm_b) / np.maximum(n_b, 1)
  t2 = tau * tau
  log_ratio = 0.5 * np.log(v / (v + t2)) + diff * diff * t2 / (2 * v * (v + t2))
  ready = (n_a >= burn_in) & (n_b >= burn_in)
  log_ratio = np.where(ready, log_ratio, 0.0)
  p_value = np.minimum.accumulate(np.minimum(1.0, np.exp(-log_ratio)))
  # Confidence sequence: the differences theta whose ratio at (diff - theta) stays below 1/alpha.
  half = np.sqrt(2 * v * (v + t2) / t2 * (math.log(1 / alpha) + 0.5 * np.log((v + t2) / v)))
  low = np.maximum.accumulate(np.where(ready, diff - half, -np.inf))
  high = np.minimum.accumulate(np.where(ready, diff + half, np.inf))
  below = np.flatnonzero(p_value < alpha)
  return Sequential(
    n=np.arange(1, len(values) + 1),
    difference=diff,
    p_value=p_value,
    ci_low=low,
    ci_high=high,
    alpha=alpha,
    tau=tau,
    flagged_at=int(below[0]) + 1 if len(below) else None,
  )
