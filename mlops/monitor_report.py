"""The monitor's outputs: JSON record, markdown report with PNGs, Prometheus gauges."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import numpy as np

from mlops import profile as profile_lib
from mlops.monitor_windows import WindowResult

TOP_FEATURES = 6
MAX_BARS = 30


def _utc(time_us: int) -> str:
  moment = datetime.datetime.fromtimestamp(time_us / 1e6, datetime.UTC)
  return moment.strftime("%Y-%m-%d %H:%M:%S")


def to_record(model: dict, read: dict, windows: list[WindowResult], options) -> dict:
  """The JSON record of a monitor run (the report is generated from it)."""
  return {
    "model": model,
    "read": read,
    "options": dataclasses.asdict(options),
    "windows": [dataclasses.asdict(w) for w in windows],
  }


def write_json(path: str, record: dict) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, default=float)
  os.replace(tmp, path)


def plot_histograms(path: str, profile: dict, window: WindowResult, groups: dict) -> None:
  """Overlays of the reference bins and the window's values for the most drifted features;
  `groups` are the window's feature matrices (profile.input_groups)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  features = {f["name"]: f for group in profile["groups"].values() for f in group}
  top = window.top_drifted(TOP_FEATURES)
  columns = {
    name: (matrix, j)
    for group, matrix in groups.items()
    for j, name in enumerate(profile_lib.feature_names(group, matrix.shape[1]))
  }
  cols = 3
  rows = max(1, -(-len(top) // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax in axes.flat[len(top) :]:
    ax.axis("off")
  for ax, result in zip(axes.flat, top, strict=False):
    feature = features[result.name]
    matrix, j = columns[result.name]
    values = matrix[:, j]
    values = values[np.isfinite(values)]
    if "bins" in feature:
      edges = np.asarray(feature["bins"]["edges"], float)
      ref = np.asarray(feature["bins"]["counts"], float)
      cur = profile_lib.bin_counts(values, edges)
      labels = [f"{e:.3g}" for e in edges[:-1]]
    else:
      known = np.asarray(feature["values"]["values"], float)
      keys = np.union1d(known, np.unique(values))  # values the training data never had, too
      ref = np.zeros(len(keys))
      ref[np.searchsorted(keys, known)] = feature["values"]["counts"]
      cur = np.array([np.sum(values == k) for k in keys], float)
      if len(keys) > MAX_BARS:  # many categories (tokens): the most frequent ones
        keep = np.sort(np.argsort(-(ref / max(ref.sum(), 1) + cur / max(cur.sum(), 1)))[:MAX_BARS])
        keys, ref, cur = keys[keep], ref[keep], cur[keep]
      labels = [f"{k:.3g}" for k in keys]
    x = np.arange(len(ref))
    ax.bar(x - 0.2, ref / max(ref.sum(), 1), 0.4, label="reference (training)")
    ax.bar(x + 0.2, cur / max(cur.sum(), 1), 0.4, label="window")
    step = max(1, len(labels) // 6)
    ax.set_xticks(x[::step], labels[::step], fontsize=8)
    ax.set_xlabel("bin (lower edge)" if "bins" in feature else "value")
    ax.set_ylabel("share of rows")
    verdict = "DRIFT" if result.drifted else "ok"
    ax.set_title(f"{result.name}: {result.method} {result.score:.3g} ({verdict})", fontsize=9)
  axes.flat[0].legend(fontsize=8)
  fig.suptitle(f"Most drifted features, window {window.index} ({window.rows} rows)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_over_time(path: str, windows: list[WindowResult], drift_share: float) -> None:
  """Share of drifted features (and labelled accuracy, when there is some) per window."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  judged = [w for w in windows if w.judged]
  with_accuracy = [w for w in judged if w.accuracy and w.accuracy.accuracy is not None]
  panels = 2 if with_accuracy else 1
  fig, axes = plt.subplots(panels, 1, figsize=(8, 3.0 * panels), squeeze=False)
  ax = axes[0, 0]
  ax.plot([w.index for w in judged], [w.drift_share for w in judged], "o-", label="drifted share")
  ax.axhline(drift_share, color="red", linestyle="--", label=f"dataset drift at {drift_share}")
  ax.set_ylim(-0.02, 1.02)
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.set_xlabel("window")
  ax.set_ylabel("share of features drifting")
  ax.set_title("Input drift over time")
  ax.legend(fontsize=8)
  if with_accuracy:
    ax = axes[1, 0]
    index = [w.index for w in with_accuracy]
    acc = np.array([w.accuracy.accuracy for w in with_accuracy])
    low = np.array([w.accuracy.ci_low for w in with_accuracy])
    high = np.array([w.accuracy.ci_high for w in with_accuracy])
    ax.errorbar(index, acc, yerr=[acc - low, high - acc], fmt="o-", capsize=3, label="accuracy")
    threshold = with_accuracy[-1].accuracy.threshold
    if threshold is not None:
      ax.axhline(threshold, color="red", linestyle="--", label=f"alert below {threshold:.3f}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("window")
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title("Accuracy on labelled rows")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def markdown(record: dict, windows: list[WindowResult], images: dict[str, str]) -> str:
  """The report, from the record (nothing hand-written)."""
  model, read = record["model"], record["read"]
  lines = [
    f"# Monitor: {model.get('name') or model['saved_model']}",
    "",
    f"Export `{model['saved_model']}`; logs `{read['logs']}`: {read['records']} records, "
    f"{read['rows']} rows read, {read['torn_records']} torn/unreadable, error records "
    f"{read['error_records'] or 'none'}, schema breaks {read['schema_breaks'] or 'none'}, "
    f"other models/versions/RPCs {read['other_records']} (judged: {read.get('rpc', 'Predict')}).",
  ]
  if read.get("feedback"):
    fb = read["feedback"]
    lines.append(
      f"Feedback `{fb['path']}`: {fb['entries']} labels, {fb['matched']} joined, "
      f"{fb['unknown_ids']} for unknown request ids."
    )
  lines += [
    "",
    "| window | start (UTC) | rows | drifted share | dataset drift | prediction "
    "drift | accuracy | quality |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for w in windows:
    if not w.judged:
      lines.append(f"| {w.index} | {_utc(w.start_us)} | {w.rows} | {w.note} | | | | |")
      continue
    acc = w.accuracy.note if w.accuracy else "no labels"
    if w.accuracy and w.accuracy.alert:
      acc = "**ALERT** " + acc
    lines.append(
      f"| {w.index} | {_utc(w.start_us)} | {w.rows} | {w.drift_share:.2f} | "
      f"{'**yes**' if w.dataset_drift else 'no'} | {'**yes**' if w.prediction_drift else 'no'} "
      f"| {acc} | {len(w.quality_alerts)} alerts |"
    )
  latest = next((w for w in reversed(windows) if w.judged), None)
  if latest:
    lines += _latest_section(latest, images)
  for name, path in images.items():
    lines += ["", f"![{name}]({os.path.basename(path)})"]
  return "\n".join(lines) + "\n"


def _latest_section(w: WindowResult, images) -> list[str]:
  lines = ["", f"## Latest judged window ({w.index}, {w.rows} rows)", ""]
  lines += [
    "| feature | method | score | threshold | drift | PSI | NaN/inf share | out of range |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for f in w.top_drifted(10):
    lines.append(
      f"| {f.name} | {f.method} | {f.score:.4g} | {f.threshold} | "
      f"{'**yes**' if f.drifted else 'no'} | {f.psi:.4g} | {f.nan_share + f.inf_share:.3f} | "
      f"{f.out_of_range_share:.3f} |"
    )
  lines += ["", "Predictions against the eval split:", ""]
  for f in w.predictions:
    lines.append(
      f"- {f.name}: {f.method} {f.score:.4g} (threshold {f.threshold}): "
      f"{'drift' if f.drifted else 'no drift'}"
    )
  if w.quality_alerts:
    lines += ["", "Data quality:", ""] + [f"- {a}" for a in w.quality_alerts[:20]]
  return lines


def set_gauges(gauges: dict, model: str, windows: list[WindowResult], read: dict) -> None:
  """Sets the gauges (from `make_gauges`) to the latest judged window's values."""
  latest = next((w for w in reversed(windows) if w.judged), None)
  gauges["rows"].labels(model).set(windows[-1].rows if windows else 0)
  gauges["schema_breaks"].labels(model).set(sum(read["schema_breaks"].values()))
  if latest is None:
    return
  gauges["drift_share"].labels(model).set(latest.drift_share)
  gauges["dataset_drift"].labels(model).set(float(latest.dataset_drift))
  gauges["prediction_drift"].labels(model).set(float(latest.prediction_drift))
  gauges["quality_alerts"].labels(model).set(len(latest.quality_alerts))
  for f in latest.features:
    gauges["feature_score"].labels(model, f.name, f.method).set(f.score)
    gauges["feature_drifted"].labels(model, f.name).set(float(f.drifted))
  if latest.accuracy and latest.accuracy.accuracy is not None:
    gauges["accuracy"].labels(model).set(latest.accuracy.accuracy)
    gauges["accuracy_alert"].labels(model).set(float(latest.accuracy.alert))


def make_gauges(registry) -> dict:
  from prometheus_client import Gauge

  def gauge(name, doc, labels=("model",)):
    return Gauge(f"model_monitor_{name}", doc, labels, registry=registry)

  return {
    "rows": gauge("window_rows", "Rows in the latest window."),
    "schema_breaks": gauge("schema_break_records", "Logged records that break the input schema."),
    "drift_share": gauge("drift_share", "Share of input features drifting (latest window)."),
    "dataset_drift": gauge("dataset_drift", "1 when the drifting share reaches the threshold."),
    "prediction_drift": gauge("prediction_drift", "1 when the served class distribution drifts."),
    "quality_alerts": gauge("quality_alerts", "Features with non-finite or out-of-range values."),
    "feature_score": gauge(
      "feature_drift_score", "Drift score per feature.", ("model", "feature", "method")
    ),
    "feature_drifted": gauge("feature_drifted", "1 when a feature drifts.", ("model", "feature")),
    "accuracy": gauge("accuracy", "Accuracy on rows with feedback labels (latest window)."),
    "accuracy_alert": gauge("accuracy_alert", "1 when accuracy is below its threshold."),
  }
