"""The study's PNGs via optuna.visualization.matplotlib: optimization history, parameter
importances and parallel coordinates. Each is skipped (with the reason returned) when the study
cannot support it yet, e.g. importances before two completed trials."""

from __future__ import annotations

import os
import warnings

import optuna


def write_plots(study: optuna.study.Study, directory: str, metric: str) -> dict[str, str]:
  """Writes the PNGs into `directory`; returns {file name or plot: "written" or why not}."""
  import matplotlib

  matplotlib.use("Agg")  # Optuna's plots draw with pyplot; never open a display.
  from matplotlib import pyplot
  from optuna.visualization import matplotlib as optuna_plots

  completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
  params = {name for t in completed for name in t.params}
  plots = {
    "optimization_history.png": (optuna_plots.plot_optimization_history, 1),
    "param_importances.png": (optuna_plots.plot_param_importances, 2),
    "parallel_coordinate.png": (optuna_plots.plot_parallel_coordinate, 1),
  }
  outcome = {}
  for name, (plot, needed) in plots.items():
    if len(completed) < needed or not params:
      outcome[name] = f"skipped: needs {needed} completed trial(s) with parameters"
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      axes = plot(study, target_name=metric)
    figure = axes.figure
    figure.set_size_inches(9, 5.5)
    figure.tight_layout()
    figure.savefig(os.path.join(directory, name), dpi=110)
    pyplot.close(figure)
    outcome[name] = "written"
  return outcome
