"""The gate's quality checks: a version evaluated on the pinned test split, per example, and the
paired statistics that compare a candidate with its baseline on the same examples.

Every comparison is paired (both models answer the same examples), and a regression is judged on
the pessimistic end of its confidence interval: a candidate passes `max_regression` only when
the data show, at the gate's confidence, that it regressed less than that.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from mlops.registry_store import RegistryError

HIGHER_IS_BETTER = {"accuracy": True, "loss": False, "perplexity": False}
METRICS = {"classification": ("accuracy", "loss"), "language_model": ("loss", "perplexity")}


@dataclasses.dataclass
class Evaluation:
  """Per-example results of one version on the test split."""

  kind: str
  split: str
  fingerprint: str
  losses: np.ndarray  # (n,) cross-entropy (LMs: mean over each row's target tokens)
  labels: np.ndarray | None = None  # classifiers: (n,)
  probabilities: np.ndarray | None = None  # classifiers: (n, classes)
  train_size: int = 0  # Examples (LMs: rows) of the training split, for the model card.

  @property
  def correct(self) -> np.ndarray:
    return (self.probabilities.argmax(-1) == self.labels).astype(np.float64)

  def metric(self, name: str) -> float:
    if name == "accuracy":
      return float(self.correct.mean())
    if name == "loss":
      return float(self.losses.mean())
    return float(math.exp(self.losses.mean()))


def restore(workdir: str, step: int):
  """The InferenceModel of step `step` of `workdir`. Raises ConfigError when it is gone."""
  from trainer import checkpointing

  return checkpointing.restore_for_inference(workdir, step)


def evaluate(model) -> Evaluation:
  """Per-example results of a restored model (`restore`) on its test split, which training
  never used for a choice (evaluation.predict_split checks that the split read now is the one
  recorded at training time). Raises ConfigError when the data is gone or has no test split."""
  from trainer import evaluation
  from trainer.data import load_dataset

  predictions = evaluation.predict_split(model, split="test")
  dataset = load_dataset(model.config.data)
  fingerprint = predictions.fingerprint or dataset.spec.fingerprints.get("test", "unknown")
  # Mean loss per example: a language model's row sums its target tokens' losses.
  losses = predictions.loss / np.maximum(predictions.weight, 1.0)
  return Evaluation(
    kind=model.data_spec.kind,
    split="test",
    fingerprint=fingerprint,
    losses=np.asarray(losses, np.float64),
    labels=predictions.labels,
    probabilities=predictions.probabilities,
    train_size=len(dataset.train),
  )


def mcnemar(baseline_correct: np.ndarray, candidate_correct: np.ndarray, confidence: float):
  """McNemar's exact test and a confidence interval for candidate - baseline accuracy.

  Returns (difference, (low, high), p value, discordant pairs (baseline only, candidate only)).
  """
  from scipy import stats

  only_baseline = int(((baseline_correct == 1) & (candidate_correct == 0)).sum())
  only_candidate = int(((baseline_correct == 0) & (candidate_correct == 1)).sum())
  n = len(baseline_correct)
  discordant = only_baseline + only_candidate
  p = 1.0 if discordant == 0 else stats.binomtest(only_candidate, discordant, 0.5).pvalue
  diff = (only_candidate - only_baseline) / n
  # Variance of a paired difference of proportions (Agresti, "Categorical Data Analysis").
  variance = (discordant / n - diff**2) / n
  z = stats.norm.ppf(0.5 + confidence / 2)
  half = z * math.sqrt(max(variance, 0.0))
  return diff, (diff - half, diff + half), float(p), (only_baseline, only_candidate)


def paired_bootstrap(baseline: np.ndarray, candidate: np.ndarray, fn, confidence, samples, seed):
  """fn(candidate sample) - fn(baseline sample) over paired resamples of the examples: the point
  difference and its percentile confidence interval."""
  rng = np.random.default_rng(seed)
  n = len(baseline)
  index = rng.integers(0, n, (samples, n))
  diffs = np.array([fn(candidate[i]) - fn(baseline[i]) for i in index])
  alpha = (1 - confidence) / 2
  low, high = np.quantile(diffs, [alpha, 1 - alpha])
  return float(fn(candidate) - fn(baseline)), (float(low), float(high))


def check_metric_names(gate, kind: str) -> None:
  """Raises RegistryError for a gate that names a metric this kind of model does not have."""
  known = METRICS[kind]
  for field in ("floors", "max_regression"):
    for name in gate.quality[field]:
      if name not in known:
        raise RegistryError(
          f"gate quality.{field} names unknown metric {name!r}; a {kind} model has "
          f"{', '.join(known)}"
        )


def quality_checks(gate, candidate: Evaluation, baseline: Evaluation | None) -> list[dict]:
  """The quality checks: absolute floors, then (with a baseline) regressions and per-class
  regressions. Each check: name, measured, threshold, verdict, detail."""
  checks = []
  for name, bound in sorted(gate.quality.floors.items()):
    value = candidate.metric(name)
    ok = value >= bound if HIGHER_IS_BETTER[name] else value <= bound
    op = ">=" if HIGHER_IS_BETTER[name] else "<="
    checks.append(
      make_check(
        f"quality.{name}_floor",
        value,
        f"{op} {bound}",
        ok,
        f"{candidate.split} split, {len(candidate.losses)} examples",
      )
    )
  if baseline is None:
    return checks
  for name, limit in sorted(gate.quality.max_regression.items()):
    checks.append(_regression(gate, name, limit, candidate, baseline))
  if candidate.kind == "classification" and gate.quality.max_class_regression is not None:
    checks.append(_class_regression(gate, candidate, baseline))
  return checks


def _regression(gate, name: str, limit: float, candidate: Evaluation, baseline: Evaluation):
  if name == "accuracy":
    diff, (low, high), p, (b_only, c_only) = mcnemar(
      baseline.correct, candidate.correct, gate.confidence
    )
    detail = f"McNemar p={p:.3g}, right only by baseline {b_only}, only by candidate {c_only}"
  else:
    fn = np.mean if name == "loss" else lambda x: math.exp(np.mean(x))
    diff, (low, high) = paired_bootstrap(
      baseline.losses, candidate.losses, fn, gate.confidence, gate.bootstrap_samples, gate.seed
    )
    detail = f"paired bootstrap, {gate.bootstrap_samples} resamples"
  # The pessimistic end: the largest regression the interval allows.
  worst = -low if HIGHER_IS_BETTER[name] else high
  detail += f"; difference {diff:+.4f}, {gate.confidence:.0%} CI [{low:+.4f}, {high:+.4f}]"
  return make_check(f"quality.{name}_regression", worst, f"<= {limit}", worst <= limit, detail)


def _class_regression(gate, candidate: Evaluation, baseline: Evaluation) -> dict:
  worst, worst_class = -math.inf, None
  for label in np.unique(candidate.labels):
    rows = candidate.labels == label
    _, (low, _), _, _ = mcnemar(baseline.correct[rows], candidate.correct[rows], gate.confidence)
    if -low > worst:
      worst, worst_class = -low, int(label)
  limit = gate.quality.max_class_regression
  return make_check(
    "quality.class_regression",
    worst,
    f"<= {limit}",
    worst <= limit,
    f"worst class {worst_class} (accuracy drop, {gate.confidence:.0%} bound)",
  )


def make_check(name, measured, threshold, ok, detail="") -> dict:
  return {
    "name": name,
    "measured": float(measured) if measured is not None else None,
    "threshold": threshold,
    "verdict": "pass" if ok else "fail",
    "detail": detail,
  }


def classifier_summary(evaluation: Evaluation, bins: int = 10) -> dict:
  """Per-class accuracy, the confusion matrix and the expected calibration error (ECE, `bins`
  equal-width confidence bins), for the model card."""
  predicted = evaluation.probabilities.argmax(-1)
  classes = evaluation.probabilities.shape[1]
  confusion = np.zeros((classes, classes), np.int64)
  np.add.at(confusion, (evaluation.labels, predicted), 1)
  confidence = evaluation.probabilities.max(-1)
  edges = np.linspace(0, 1, bins + 1)
  ece = 0.0
  for low, high in itertools.pairwise(edges):
    rows = (confidence > low) & (confidence <= high)
    if rows.any():
      ece += rows.mean() * abs(evaluation.correct[rows].mean() - confidence[rows].mean())
  per_class = {str(c): float(confusion[c, c] / max(confusion[c].sum(), 1)) for c in range(classes)}
  return {"per_class_accuracy": per_class, "confusion_matrix": confusion.tolist(), "ece": ece}
