"""Markdown tables and PNG saving shared by the reports (training, A/B test, shadow).

Kept apart from mlops/report_plots.py and mlops/report_sections.py because those import the
trainer (JAX, Orbax) to read runs; the log reports use these helpers without that start-up cost.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub-flavoured markdown table; floats to 4 significant digits, NaN as n/a."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def cell(value: object) -> str:
  if isinstance(value, float):
    return "n/a" if math.isnan(value) else f"{value:.4g}"
  return str(value).replace("|", "\\|")


def save_figure(figure: Figure, directory: str, name: str) -> str:
  """Draws `figure` on the Agg canvas (no pyplot state, thread-safe) into directory/name;
  returns `name`."""
  FigureCanvasAgg(figure)
  figure.savefig(os.path.join(directory, name), dpi=DPI)
  return name


def no_data(axes, what: str) -> None:
  axes.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=axes.transAxes)


def latency_cdfs(axes, latency_ms: dict[str, np.ndarray]) -> bool:
  """Empirical CDFs of latencies (ms), one line per name; a log axis only when the values span
  more than a decade (narrow ranges get unreadable log ticks). Returns whether anything was drawn."""
  drawn = [v for v in latency_ms.values() if len(v)]
  for name, values in latency_ms.items():
    if len(values):
      ordered = np.sort(values)
      axes.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=name)
  if not drawn:
    no_data(axes, "latencies")
    axes.set(title="Latency (empirical CDF)", xlabel="latency (ms)", ylabel="share <= x")
    return False
  low = min(float(np.min(v)) for v in drawn)
  high = max(float(np.max(v)) for v in drawn)
  log = low > 0 and high / low > 10
  if log:
    axes.set_xscale("log")
  axes.legend(fontsize=8)
  axes.set(title="Latency (empirical CDF)", ylabel="share <= x")
  axes.set(xlabel="latency (ms, log scale)" if log else "latency (ms)")
  return True
