r"""Hyperparameter search with Optuna: one worker of a study, sharing it through a storage.

  python -m mlops.hpo --config=configs/digits_cnn.py --study=digits-lr --n_trials=20 \
      [--storage=sqlite:///runs/hpo.db | postgresql+psycopg://... | journal:runs/hpo.log] \
      [--sampler=tpe|random|cmaes|grid] [--pruner=median|hyperband|none] [--seed=0] \
      [--timeout_s=...] [--config.train.num_steps=...]

The search space is `get_search_space(trial)` in the config module, returning config overrides;
the objective is `config.eval.best_metric` (best over the trial's evals) in `config.eval.best_mode`.
Each trial trains in `<study_dir>/trial-NNNN` as an MLflow child run of the study's run; every eval
reports to Optuna and a pruned trial stops there with its checkpoint kept. Start the same command
in several processes (on one machine, or many against PostgreSQL) to share the study: together
they run --n_trials trials. At the end each worker writes `<study_dir>/best_overrides.json` (the
best trial, its overrides and the command that trains it) and the study's plots.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mlops import hpo_study
from mlops.hpo_tracking import Lineage, StudyTracker
from mlops.hpo_trials import Search, load_search_space, make_objective, write_results
from trainer import log_filter
from trainer.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file (optionally `:arg`) whose module defines get_search_space(trial).",
  lock_config=True,
)
_STUDY = flags.DEFINE_string("study", None, "Study name; workers with the same name share it.")
_N_TRIALS = flags.DEFINE_integer("n_trials", 20, "Trials of the whole study, over all workers.")
_STORAGE = flags.DEFINE_string(
  "storage",
  "sqlite:///runs/hpo.db",
  "Optuna storage: sqlite:///PATH, postgresql+psycopg://USER:PW@HOST/DB (many machines) or "
  "journal:PATH (a file, no heartbeats).",
)
_SAMPLER = flags.DEFINE_string("sampler", "tpe", f"One of {', '.join(hpo_study.SAMPLERS)}.")
_PRUNER = flags.DEFINE_string("pruner", "median", f"One of {', '.join(hpo_study.PRUNERS)}.")
_SEED = flags.DEFINE_integer(
  "seed", 0, "Sampler seed: the same seed and a fresh storage suggest the same parameters."
)
_TIMEOUT = flags.DEFINE_float("timeout_s", None, "Stop starting trials after this many seconds.")
_STUDY_DIR = flags.DEFINE_string(
  "study_dir", None, "Where trial workdirs and results go; default runs/hpo/<study>."
)
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_interval_s",
  10,
  "RDB storages: a running trial's heartbeat period; a trial silent for twice this is FAILED "
  "and retried.",
)
flags.mark_flags_as_required(["config", "study"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  log_filter.quiet_library_info_logs()
  try:
    lines = run(_CONFIG.value, flags.FLAGS["config"].config_filename)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print("\n".join(lines), flush=True)


def run(config: ml_collections.ConfigDict, config_arg: str) -> list[str]:
  """One worker: validates the flags, joins the study, runs trials, writes the results."""
  search_space = load_search_space(config_arg)
  if _N_TRIALS.value < 1:
    raise ConfigError(f"--n_trials={_N_TRIALS.value} must be >= 1")
  if _HEARTBEAT.value < 1:
    raise ConfigError(f"--heartbeat_interval_s={_HEARTBEAT.value} must be >= 1")
  grid = hpo_study.grid_of(search_space) if _SAMPLER.value == "grid" else None
  sampler = hpo_study.make_sampler(_SAMPLER.value, _SEED.value, grid)
  pruner = hpo_study.make_pruner(_PRUNER.value, config.eval.every_steps, config.train.num_steps)
  search = Search(
    config=config,
    config_arg=config_arg,
    search_space=search_space,
    study_dir=_STUDY_DIR.value or os.path.join("runs", "hpo", _STUDY.value),
    n_trials=_N_TRIALS.value,
    metric=config.eval.best_metric,
    maximize=config.eval.best_mode == "max",
    given_overrides=dict(config_flags.get_override_values(flags.FLAGS["config"])),
  )
  storage = hpo_study.open_storage(_STORAGE.value, _HEARTBEAT.value)
  direction = "maximize" if search.maximize else "minimize"
  study, created = hpo_study.create_or_load_study(_STUDY.value, storage, sampler, pruner, direction)
  os.makedirs(search.study_dir, exist_ok=True)
  tracker = StudyTracker(
    config,
    Lineage(
      _STUDY.value, _SAMPLER.value, _PRUNER.value, _SEED.value, hpo_study.redact(_STORAGE.value)
    ),
  )
  tracker.start(study, storage, created=created)
  objective = make_objective(search, study, tracker)
  hpo_study.run_worker(
    study,
    objective,
    search.n_trials,
    _TIMEOUT.value,
    poll_s=_HEARTBEAT.value / 2,
    heartbeats=hpo_study.has_heartbeats(storage),
  )
  return write_results(search, study, tracker)


if __name__ == "__main__":
  app.run(main)
