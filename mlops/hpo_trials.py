"""One study's trials: the search space, the objective that trains a trial, and the results.

Used by the `python -m mlops.hpo` CLI (mlops/hpo.py) and the benchmarks; defines no flags.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import shlex

import ml_collections
import optuna
from absl import logging

from mlops import hpo_plots, hpo_study
from mlops.hpo_tracking import StudyTracker
from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Search:
  config: ml_collections.ConfigDict
  config_arg: str
  search_space: object
  study_dir: str
  n_trials: int
  metric: str
  maximize: bool
  # `--config.x=...` overrides the search was started with (they go into the best's command).
  given_overrides: dict = dataclasses.field(default_factory=dict)


def load_search_space(config_arg: str):
  """`get_search_space` of the config file; raises ConfigError when it has none."""
  path = config_arg.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("_hpo_config_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fn = getattr(module, "get_search_space", None)
  if not callable(fn):
    raise ConfigError(
      f"{path} defines no get_search_space(trial); add one returning config overrides, e.g. "
      '{"optim.learning_rate": trial.suggest_float("optim.learning_rate", 1e-4, 1e-2, log=True)}'
    )
  return fn


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict
) -> ml_collections.ConfigDict:
  """A copy of `config` with `{"group.field": value}` set; ConfigError for an unknown field."""
  config = copy.deepcopy(config)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    try:
      for parent in parents:
        node = node[parent]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, TypeError, AttributeError) as e:
      raise ConfigError(
        f"get_search_space returned {dotted!r}={value!r}, which is not a settable config field "
        f"({e}); use the dotted name of a field in configs/base.py"
      ) from e
  return config


def make_objective(search: Search, study: optuna.study.Study, tracker: StudyTracker):
  def objective(trial: optuna.trial.Trial) -> float:
    if hpo_study.is_surplus(study, trial, search.n_trials):
      trial.set_user_attr("surplus", True)
      raise hpo_study.SurplusTrial(f"trial {trial.number} is past --n_trials; not run")
    overrides = search.search_space(trial)
    config = apply_overrides(search.config, overrides)
    workdir = os.path.join(search.study_dir, f"trial-{trial.number:04d}")
    trial.set_user_attr("workdir", os.path.abspath(workdir))
    trial.set_user_attr("overrides", overrides)
    tracker.start_trial(trial.number, overrides, workdir)
    values: list[float] = []

    def on_eval(step: int, metrics: dict[str, float]) -> bool:
      values.append(metrics[f"eval/{search.metric}"])
      trial.report(values[-1], step)
      return trial.should_prune()

    from trainer import train  # Deferred: bad flags fail before JAX loads.

    result = train.train_and_evaluate(config, workdir, on_eval=on_eval)
    best = max(values) if search.maximize else min(values)
    if result.stopped_by_callback:
      tracker.tag_trial(workdir, {"hpo.state": "PRUNED"})
      logging.info("Trial %d pruned at step %d (checkpoint kept).", trial.number, result.step)
      raise optuna.TrialPruned(f"pruned at step {result.step}")
    tracker.tag_trial(workdir, {"hpo.state": "COMPLETE", "hpo.value": best})
    return best

  return objective


def train_command(search: Search, overrides: dict) -> str:
  """The command line that trains the best trial's config from scratch."""
  given = search.given_overrides
  args = [
    "python",
    "-m",
    "trainer.main",
    f"--config={search.config_arg}",
    f"--workdir={os.path.join(search.study_dir, 'best')}",
  ]
  args += [f"--config.{k}={v}" for k, v in {**given, **overrides}.items()]
  return " ".join(shlex.quote(a) for a in args)


def write_results(search: Search, study: optuna.study.Study, tracker: StudyTracker) -> list[str]:
  """best_overrides.json, plots and MLflow tags; returns the summary lines."""
  counts = hpo_study.trial_summary(study)
  lines = [f"study {study.study_name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
  pruned = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.PRUNED,))]
  if pruned:
    lines.append(f"pruned trials (stopped at an eval, checkpoint kept): {pruned}")
  try:
    best = study.best_trial
  except ValueError:
    lines.append("no trial completed; nothing to report")
    return lines
  overrides = best.user_attrs.get("overrides", best.params)
  command = train_command(search, overrides)
  record = {
    "study": study.study_name,
    "trial": best.number,
    "metric": f"eval/{search.metric}",
    "direction": study.direction.name.lower(),
    "value": best.value,
    "overrides": overrides,
    "workdir": best.user_attrs.get("workdir"),
    "command": command,
  }
  path = os.path.join(search.study_dir, "best_overrides.json")
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)
  plots = hpo_plots.write_plots(study, search.study_dir, f"eval/{search.metric}")
  if best.user_attrs.get("workdir"):
    tracker.tag_trial(best.user_attrs["workdir"], {"hpo.best": "true"})
  tracker.finish(
    {
      "hpo.best_trial": best.number,
      "hpo.best_value": best.value,
      "hpo.trials": sum(counts.values()),
    },
    None,
  )
  lines += [
    f"best trial {best.number}: eval/{search.metric} {best.value:.4f}",
    f"best overrides: {path}",
    f"train it: {command}",
  ]
  lines += [f"plot {name}: {state}" for name, state in plots.items()]
  return lines
