"""The report's PNGs, drawn with matplotlib's object API on the Agg canvas (no pyplot state, no
display, safe off the main thread). Each function writes one file and returns its name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from mlops.report_format import no_data as _no_data
from mlops.report_format import save_figure as _save
from mlops.report_records import RunRecords


def _plot_series(axes, records: RunRecords, tag: str, label: str, **style) -> bool:
  series = records.series(tag)
  if series is None or not len(series[0]):
    return False
  axes.plot(series[0], series[1], label=label, marker="o" if len(series[0]) < 30 else None, **style)
  return True


def training_curves(records: RunRecords, best_metric: str, directory: str) -> str:
  """Train and eval loss, the eval metric and the learning rate against step."""
  figure = Figure(figsize=(13, 3.8), layout="constrained")
  loss, metric, lr = figure.subplots(1, 3)
  drawn = _plot_series(loss, records, "train/loss", "train")
  drawn |= _plot_series(loss, records, "eval/loss", "eval")
  if drawn:
    loss.legend()
  else:
    _no_data(loss, "loss")
  loss.set(title="Loss", xlabel="step", ylabel="cross-entropy")
  if not _plot_series(metric, records, f"eval/{best_metric}", "eval", color="tab:green"):
    _no_data(metric, f"eval/{best_metric}")
  metric.set(title=f"Eval {best_metric}", xlabel="step", ylabel=best_metric)
  if not _plot_series(lr, records, "train/learning_rate", "lr", color="tab:purple"):
    _no_data(lr, "learning rate")
  lr.set(title="Learning rate", xlabel="step", ylabel="learning rate")
  lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
  for axes in (loss, metric, lr):
    axes.grid(alpha=0.3)
  return _save(figure, directory, "curves.png")


def confusion_matrix(confusion: np.ndarray, directory: str) -> str:
  """Counts of true (rows) against predicted (columns) classes, annotated."""
  classes = len(confusion)
  size = min(4 + 0.45 * classes, 14)
  figure = Figure(figsize=(size + 1, size), layout="constrained")
  axes = figure.subplots()
  image = axes.imshow(confusion, cmap="Blues")
  figure.colorbar(image, ax=axes, label="examples")
  if classes <= 20:
    threshold = confusion.max() / 2
    for (true, predicted), count in np.ndenumerate(confusion):
      color = "white" if count > threshold else "black"
      axes.text(predicted, true, str(count), ha="center", va="center", color=color, fontsize=8)
  ticks = np.arange(classes) if classes <= 30 else np.linspace(0, classes - 1, 10, dtype=int)
  axes.set_xticks(ticks)
  axes.set_yticks(ticks)
  axes.set(title="Confusion matrix (eval split)", xlabel="predicted class", ylabel="true class")
  return _save(figure, directory, "confusion_matrix.png")


def per_class_accuracy(accuracy: np.ndarray, directory: str) -> str:
  figure = Figure(figsize=(max(5, 0.4 * len(accuracy) + 2), 3.5), layout="constrained")
  axes = figure.subplots()
  axes.bar(np.arange(len(accuracy)), np.nan_to_num(accuracy), color="tab:blue")
  axes.set(
    title="Per-class accuracy (eval split)", xlabel="class", ylabel="accuracy", ylim=(0, 1.05)
  )
  if len(accuracy) <= 30:
    axes.set_xticks(np.arange(len(accuracy)))
  axes.grid(axis="y", alpha=0.3)
  return _save(figure, directory, "per_class_accuracy.png")


def language_model_curves(records: RunRecords, directory: str) -> str:
  """Perplexity (exp of the loss) and tokens/s against step."""
  figure = Figure(figsize=(10, 3.8), layout="constrained")
  perplexity, throughput = figure.subplots(1, 2)
  drawn = False
  for tag, label in (("train/loss", "train"), ("eval/loss", "eval")):
    series = records.series(tag)
    if series is not None and len(series[0]):
      perplexity.plot(series[0], np.exp(series[1]), label=label, marker="o")
      drawn = True
  if drawn:
    perplexity.legend()
  else:
    _no_data(perplexity, "loss")
  perplexity.set(title="Perplexity", xlabel="step", ylabel="perplexity (exp loss)", yscale="log")
  if not _plot_series(throughput, records, "perf/tokens_per_sec", "tokens/s", color="tab:orange"):
    _no_data(throughput, "throughput")
  throughput.set(title="Training throughput", xlabel="step", ylabel="tokens / s")
  for axes in (perplexity, throughput):
    axes.grid(alpha=0.3)
  return _save(figure, directory, "perplexity_throughput.png")


def compare_curves(
  runs: Sequence[RunRecords], names: Sequence[str], best_metric: str, directory: str
) -> str:
  """Train loss and the eval metric of several runs, overlaid."""
  figure = Figure(figsize=(11, 4), layout="constrained")
  loss, metric = figure.subplots(1, 2)
  for records, name in zip(runs, names, strict=True):
    _plot_series(loss, records, "train/loss", name)
    _plot_series(metric, records, f"eval/{best_metric}", name)
  loss.set(title="Train loss", xlabel="step", ylabel="cross-entropy")
  metric.set(title=f"Eval {best_metric}", xlabel="step", ylabel=best_metric)
  for axes in (loss, metric):
    axes.grid(alpha=0.3)
    if axes.get_lines():
      axes.legend(fontsize=8)
    else:
      _no_data(axes, "curves")
  return _save(figure, directory, "compare_curves.png")
