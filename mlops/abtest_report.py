"""The A/B test report: abtest.md, abtest.json and PNGs from an `AbtestResult`.

Drawn with matplotlib's object API on the Agg canvas (mlops/report_format.py, as the training
report); files are staged and moved into place only once all of them are written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile

import numpy as np
from matplotlib.figure import Figure

from mlops import report_format
from mlops.abtest import AbtestResult, ArmComparison
from mlops.abtest_stats import SRM_ALPHA


def write(result: AbtestResult, out: str) -> str:
  """Writes the report files into `out` (created if needed; other files there are kept);
  returns the markdown's path."""
  os.makedirs(out, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".abtest-", dir=out)
  try:
    images = [overview_plot(result, staging)]
    for comparison in result.comparisons:
      if comparison.sequential is not None:
        images.append(sequential_plot(result, comparison, staging))
    with open(os.path.join(staging, "abtest.md"), "w") as f:
      f.write(markdown(result, images))
    with open(os.path.join(staging, "abtest.json"), "w") as f:
      json.dump(to_record(result), f, indent=1, default=float)
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return os.path.join(out, "abtest.md")


def to_record(result: AbtestResult) -> dict:
  """The JSON record (no per-row arrays; the sequential path as its last point)."""
  comparisons = []
  for c in result.comparisons:
    entry = dataclasses.asdict(dataclasses.replace(c, sequential=None))
    if c.sequential is not None:
      s = c.sequential
      entry["sequential"] = {
        "p_value": float(s.p_value[-1]),
        "ci": [float(s.ci_low[-1]), float(s.ci_high[-1])],
        "alpha": s.alpha,
        "tau": s.tau,
        "flagged_at": s.flagged_at,
      }
    comparisons.append(entry)
  return {
    "logs": result.logs_dir,
    "metric": result.metric,
    "control": result.control,
    "weights": result.weights,
    "weights_assumed": result.weights_assumed,
    "srm": dataclasses.asdict(result.srm),
    "arms": result.arms,
    "comparisons": comparisons,
    "read": result.read,
  }


def summary(result: AbtestResult) -> str:
  """One line per finding, for the terminal."""
  srm = result.srm
  lines = [
    f"SRM: {'MISMATCH' if srm.flagged else 'ok'} (chi2 {srm.chi2:.2f}, p {srm.p_value:.3g}; "
    + ", ".join(f"{a} {n}" for a, n in srm.observed.items())
    + ")"
  ]
  for c in result.comparisons:
    line = f"{c.arm} vs {result.control}: "
    if c.metric:
      m = c.metric
      line += (
        f"{result.metric} {m.difference:+.4f} (95% CI {m.ci_low:+.4f}..{m.ci_high:+.4f}, "
        f"p {m.p_value:.3g}); "
      )
    line += f"p99 {c.latency.p99_ms[c.arm]:.2f} vs {c.latency.p99_ms[result.control]:.2f} ms"
    if c.sequential is not None:
      line += f"; always-valid p {c.sequential.p_value[-1]:.3g}"
    lines.append(line)
  return "\n".join(lines)


def _pct(value: float) -> str:
  return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"


def _split_section(result: AbtestResult) -> list[str]:
  srm = result.srm
  origin = (
    "**assumed equal** (no --weights given)"
    if result.weights_assumed
    else ", ".join(f"{a} {w:g}" for a, w in result.weights.items())
  )
  rows = [
    (
      arm,
      s["requests"],
      f"{srm.expected[arm]:.1f}",
      s["errors"],
      _pct(s["errors"] / max(s["requests"], 1)),
      s["labelled"],
      _pct(s["metric"]),
    )
    for arm, s in result.arms.items()
  ]
  verdict = (
    f"**SAMPLE RATIO MISMATCH** (p = {srm.p_value:.3g} < {SRM_ALPHA}): the split or the logging "
    "is broken; do not trust the comparisons below until it is explained."
    if srm.flagged
    else f"no sample ratio mismatch (p = {srm.p_value:.3g} >= {SRM_ALPHA})."
  )
  return [
    "## Split",
    "",
    f"Configured weights: {origin}. Pearson chi-square {srm.chi2:.3f}: {verdict}",
    "",
    report_format.table(
      ("arm", "requests", "expected", "errors", "error rate", "labelled rows", result.metric),
      rows,
    ),
  ]


def _comparison_section(result: AbtestResult, c: ArmComparison) -> list[str]:
  lines = ["", f"## {c.arm} against {result.control}", ""]
  rows = []
  for name, d in (("error rate", c.errors), (result.metric, c.metric)):
    if d is None:
      continue
    rows.append(
      (
        name,
        _pct(d.control),
        _pct(d.treatment),
        f"{d.difference:+.4f}",
        f"{d.ci_low:+.4f} .. {d.ci_high:+.4f}",
        f"{d.p_value:.3g}",
      )
    )
  lat = c.latency
  header = ("", result.control, c.arm, "difference", "95% CI", "p-value")
  lines.append(report_format.table(header, rows))
  if c.metric is None:
    lines += ["", f"No {result.metric} comparison: an arm has no labelled rows (--feedback)."]
  lines += [
    "",
    f"Latency: p50 {lat.p50_ms[result.control]:.3f} / {lat.p50_ms[c.arm]:.3f} ms, p99 "
    f"{lat.p99_ms[result.control]:.3f} / {lat.p99_ms[c.arm]:.3f} ms ({result.control} / "
    f"{c.arm}); Mann-Whitney U p = {lat.p_value:.3g}.",
    "",
  ]
  plan = c.plan
  if "need" in plan:
    need = ", ".join(f"{a} {n}" for a, n in plan["need"].items())
    wait = (
      "reached."
      if plan["more_requests"] == 0
      else f"about {plan['more_requests']} more requests at the current weights and label coverage."
    )
    lines.append(
      f"Sample size to detect a change of {plan['mde']:g} in {result.metric} (alpha 0.05, "
      f"power 0.8): labelled rows needed per arm: {need}; {wait}"
    )
  else:
    lines.append(f"Sample size: {plan['note']}.")
  if c.sequential is not None:
    s = c.sequential
    verdict = (
      f"**significant** after {s.flagged_at} labelled rows"
      if s.flagged_at
      else "not significant so far"
    )
    lines += [
      "",
      f"Sequential (mSPRT, mixture N(0, {s.tau:g}^2)): always-valid p = {s.p_value[-1]:.3g}, "
      f"{1 - s.alpha:.0%} confidence sequence {s.ci_low[-1]:+.4f} .. {s.ci_high[-1]:+.4f}: "
      f"{verdict}. Valid at every look: rerun this report as often as you like.",
    ]
  return lines


def markdown(result: AbtestResult, images: list[str]) -> str:
  """The report, from the result (nothing hand-written)."""
  read = result.read
  lines = [
    f"# A/B test: {result.logs_dir}",
    "",
    f"{read['records']} records read ({read['torn_records']} torn/unreadable); "
    f"{read['shadow_rows']} shadow rows and {read['bypassed_rows']} rows outside the split "
    "(named a version or label) left out; schema breaks "
    f"{read['schema_breaks'] or 'none'}.",
  ]
  if read["feedback"]:
    fb = read["feedback"]
    lines.append(
      f"Feedback `{fb['path']}`: {fb['entries']} labels, {fb['matched']} joined to split "
      f"requests, {fb['unknown_ids']} for other request ids."
    )
  lines += ["", *_split_section(result)]
  for c in result.comparisons:
    lines += _comparison_section(result, c)
  lines += [
    "",
    "Fixed-horizon p-values and CIs hold when read once at a planned sample size; to look "
    "repeatedly, use --sequential.",
  ]
  lines += ["", *[f"![{name}]({name})" for name in images]]
  return "\n".join(lines) + "\n"


def overview_plot(result: AbtestResult, directory: str) -> str:
  """Requests per arm against the expected counts, the metric with 95% CIs, latency CDFs."""
  figure = Figure(figsize=(14, 4), layout="constrained")
  counts, metric, latency = figure.subplots(1, 3)
  arms = list(result.arms)
  x = np.arange(len(arms))
  counts.bar(x - 0.2, [result.arms[a]["requests"] for a in arms], 0.4, label="observed")
  counts.bar(x + 0.2, [result.srm.expected[a] for a in arms], 0.4, label="expected by weights")
  counts.set_xticks(x, arms)
  flag = "MISMATCH" if result.srm.flagged else "ok"
  counts.set(title=f"Requests per arm (SRM {flag}, p={result.srm.p_value:.2g})", xlabel="arm")
  counts.set(ylabel="requests")
  top = max([result.arms[a]["requests"] for a in arms] + list(result.srm.expected.values()))
  counts.set_ylim(0, 1.25 * max(top, 1))  # room for the legend above the bars
  counts.legend(fontsize=8, loc="upper right")
  values, errs = [], [[], []]
  for a in arms:
    s = result.arms[a]
    value = s["metric"]
    low, high = _wald(s["correct"], s["labelled"]) if s["labelled"] else (value, value)
    values.append(value)
    errs[0].append(value - low)
    errs[1].append(high - value)
  if any(result.arms[a]["labelled"] for a in arms):
    metric.errorbar(x, values, yerr=errs, fmt="o", capsize=5)
    metric.set_xticks(x, arms)
    metric.set_xlim(-0.5, len(arms) - 0.5)
  else:
    report_format.no_data(metric, "labels (--feedback)")
  metric.set(title=f"{result.metric} per arm (95% CI)", xlabel="arm", ylabel=result.metric)
  report_format.latency_cdfs(latency, {a: result.latency_us[a] / 1e3 for a in arms})
  for axes in (counts, metric, latency):
    axes.grid(alpha=0.3)
  return report_format.save_figure(figure, directory, "abtest.png")


def _wald(successes: int, n: int) -> tuple[float, float]:
  p = successes / n
  half = 1.96 * math.sqrt(p * (1 - p) / n)
  return max(p - half, 0.0), min(p + half, 1.0)


def sequential_plot(result: AbtestResult, c: ArmComparison, directory: str) -> str:
  """The always-valid p-value and confidence sequence against labelled rows seen."""
  s = c.sequential
  figure = Figure(figsize=(11, 4), layout="constrained")
  p_axes, ci_axes = figure.subplots(1, 2)
  p_axes.plot(s.n, s.p_value, label="always-valid p")
  p_axes.axhline(s.alpha, color="red", linestyle="--", label=f"alpha {s.alpha}")
  p_axes.set(yscale="log", title="Always-valid p-value (mSPRT)", xlabel="labelled rows seen")
  p_axes.set(ylabel="p-value")
  p_axes.legend(fontsize=8)
  finite = np.isfinite(s.ci_low) & np.isfinite(s.ci_high)
  ci_axes.plot(s.n, s.difference, label=f"{c.arm} - {result.control}")
  ci_axes.fill_between(
    s.n[finite], s.ci_low[finite], s.ci_high[finite], alpha=0.3, label="confidence sequence"
  )
  ci_axes.axhline(0, color="black", linewidth=0.8)
  ci_axes.set(title=f"Difference in {result.metric}", xlabel="labelled rows seen")
  ci_axes.set(ylabel=f"{result.metric} difference")
  if finite.any():  # the first rows' intervals are huge; show the informative range
    span = max(float(np.max(np.abs(s.ci_high[finite][-1]))), float(np.abs(s.ci_low[finite][-1])))
    ci_axes.set_ylim(-3 * span, 3 * span)
  ci_axes.legend(fontsize=8)
  for axes in (p_axes, ci_axes):
    axes.grid(alpha=0.3)
  return report_format.save_figure(figure, directory, f"sequential_{c.arm}.png")
