"""Markdown tables and PNG saving shared by the reports (training, A/B test, shadow).

Kept apart from mlops/report_plots.py and mlops/report_sections.py because those import the
trainer (JAX, Orbax) to read runs; the log reports use these helpers without that start-up cost.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

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
