"""The Optuna side of hyperparameter search: storages, samplers, pruners, the study and its trials.

Every Optuna call of the project lives here. Workers (processes on one machine or many) that run
the same study against one storage share it: trial numbers come from the storage, so every trial
runs exactly once, and with an RDB storage (SQLite, PostgreSQL) each running trial sends a
heartbeat, so a worker killed mid-trial leaves its trial FAILED (found by the next worker that
starts a trial) and `RetryHeartbeatStaleTrialCallback` queues a copy of it, which a worker runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable

import optuna
from absl import logging

from trainer.errors import ConfigError, NonFiniteError

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "none")
# Seconds a worker may take to connect to the storage before it is called unreachable.
CONNECT_TIMEOUT_S = 5
# Tries at opening an RDB storage whose tables another worker is creating.
_CREATE_ATTEMPTS = 5
# Points a continuous parameter contributes to a grid (low, middle, high).
_GRID_POINTS = 3


class SurplusTrial(Exception):
  """A trial asked for past the budget (workers raced); recorded FAIL, never run."""


def redact(url: str) -> str:
  """The storage URL with any password hidden, for messages."""
  if "://" not in url:
    return url
  import sqlalchemy

  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except sqlalchemy.exc.ArgumentError:
    return url


def open_storage(url: str, heartbeat_interval_s: int) -> optuna.storages.BaseStorage:
  """An RDB storage (sqlite:///, postgresql+psycopg://, ...) with heartbeats and retries, or a
  journal file (`journal:PATH`, no heartbeats). Raises ConfigError naming an unreachable one."""
  if url.startswith("journal:"):
    path = url[len("journal:") :]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
  engine_kwargs = {}
  if url.startswith("sqlite:///"):
    os.makedirs(os.path.dirname(os.path.abspath(url[len("sqlite:///") :])), exist_ok=True)
  elif url.startswith("postgresql"):
    engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
  import sqlalchemy

  for attempt in range(_CREATE_ATTEMPTS):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
          url,
          engine_kwargs=engine_kwargs,
          heartbeat_interval=heartbeat_interval_s,
          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=3
          ),
        )
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
      # Workers starting together on a fresh database race to create Optuna's tables; the
      # loser sees them half-made. They exist a moment later.
      if attempt == _CREATE_ATTEMPTS - 1:
        raise
      time.sleep(0.5 * (attempt + 1))
    except Exception as e:  # SQLAlchemy/driver errors: the storage cannot be used as given.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConfigError(
        f"cannot reach --storage={redact(url)}: {reason}; check the URL, that the database "
        "server is up, and the credentials"
      ) from e
  raise AssertionError("unreachable")


def make_sampler(name: str, seed: int, search_space: dict | None) -> optuna.samplers.BaseSampler:
  if name == "tpe":
    return optuna.samplers.TPESampler(seed=seed)
  if name == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  if name == "cmaes":
    try:
      import cmaes  # noqa: F401 - Optuna's CMA-ES sampler needs it.
    except ImportError as e:
      raise ConfigError(
        "--sampler=cmaes needs the cmaes package, which is not installed; use tpe or random"
      ) from e
    return optuna.samplers.CmaEsSampler(seed=seed)
  if name == "grid":
    return optuna.samplers.GridSampler(search_space, seed=seed)
  raise ConfigError(f"--sampler={name!r} is unknown; choose one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, eval_every_steps: int, num_steps: int) -> optuna.pruners.BasePruner:
  """Pruners count in training steps (what the trainer reports evals at)."""
  if name == "median":
    return optuna.pruners.MedianPruner()
  if name == "hyperband":
    return optuna.pruners.HyperbandPruner(min_resource=eval_every_steps, max_resource=num_steps)
  if name == "none":
    return optuna.pruners.NopPruner()
  raise ConfigError(f"--pruner={name!r} is unknown; choose one of {', '.join(PRUNERS)}")


class _GridProbe:
  """Stands in for a trial to read a search space's choices, for the grid sampler."""

  def __init__(self):
    self.grid: dict[str, list] = {}

  def suggest_categorical(self, name, choices):
    self.grid[name] = list(choices)
    return self.grid[name][0]

  def suggest_int(self, name, low, high, step=1, log=False):
    values = list(range(low, high + 1, step))
    if len(values) > 20:
      values = sorted({round(v) for v in _spread(low, high, _GRID_POINTS, log)})
    self.grid[name] = values
    return values[0]

  def suggest_float(self, name, low, high, step=None, log=False):
    if step:
      count = round((high - low) / step) + 1
      self.grid[name] = [low + i * step for i in range(min(count, 20))]
    else:
      self.grid[name] = _spread(low, high, _GRID_POINTS, log)
    return self.grid[name][0]


def _spread(low: float, high: float, points: int, log: bool) -> list[float]:
  import numpy as np

  values = np.geomspace(low, high, points) if log and low > 0 else np.linspace(low, high, points)
  return [float(v) for v in values]


def grid_of(search_space_fn: Callable) -> dict[str, list]:
  """The grid a search-space function spans: categorical choices, int and stepped ranges, and
  low/middle/high for continuous parameters (log-spaced when `log=True`)."""
  probe = _GridProbe()
  search_space_fn(probe)
  return probe.grid


def create_or_load_study(
  name: str, storage, sampler, pruner, direction: str
) -> tuple[optuna.study.Study, bool]:
  """(the named study, whether this call created it: of workers starting together exactly one
  does); raises ConfigError when it exists with another direction."""
  try:
    existing = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
  except KeyError:
    existing = None
  if existing is not None:
    have = existing.direction.name.lower()
    if have != direction:
      raise ConfigError(
        f"study {name!r} in the storage already exists and {have}s, but this config "
        f"(config.eval.best_mode) wants to {direction}; use another --study name"
      )
    return existing, False
  try:
    study = optuna.create_study(
      study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction=direction
    )
  except optuna.exceptions.DuplicatedStudyError:  # Another worker created it just now.
    return create_or_load_study(name, storage, sampler, pruner, direction)[0], False
  return study, True


@dataclasses.dataclass(frozen=True)
class Budget:
  """Where the study stands against its trial budget."""

  used: int
  running: int
  waiting: int

  def full(self, n_trials: int) -> bool:
    return self.used >= n_trials


def _uses_budget(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
  """Trials that count against n_trials: all but stale ones that were retried (their retry
  counts instead) and surplus ones that never ran."""
  retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
  return [t for t in trials if t.number not in retried and not t.user_attrs.get("surplus")]


def budget(study: optuna.study.Study) -> Budget:
  trials = _uses_budget(study.get_trials(deepcopy=False))
  return Budget(
    used=len(trials),
    running=sum(t.state == optuna.trial.TrialState.RUNNING for t in trials),
    waiting=sum(t.state == optuna.trial.TrialState.WAITING for t in trials),
  )


def is_surplus(study: optuna.study.Study, trial: optuna.trial.Trial, n_trials: int) -> bool:
  """Whether `trial` lies past the budget: workers that asked at the same moment can overshoot
  by a trial; the one with the higher number then does not run."""
  trials = study.get_trials(deepcopy=False)
  earlier = [t for t in _uses_budget(trials) if t.number < trial.number]
  return len(earlier) >= n_trials


def has_heartbeats(storage: optuna.storages.BaseStorage) -> bool:
  return isinstance(storage, optuna.storages.RDBStorage)


def fail_stale_trials(study: optuna.study.Study) -> None:
  """Marks trials of dead workers FAILED (and queues their retries) once heartbeats are stale."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    optuna.storages.fail_stale_trials(study)


def run_worker(
  study: optuna.study.Study,
  objective: Callable[[optuna.trial.Trial], float],
  n_trials: int,
  timeout_s: float | None,
  poll_s: float,
  heartbeats: bool,
) -> int:
  """Runs trials until the study has `n_trials` (counting other workers'), then waits for
  running ones so that a dead worker's trial is retried, not lost. Returns trials run here."""
  start, ran = time.monotonic(), 0
  while timeout_s is None or time.monotonic() - start < timeout_s:
    if heartbeats:
      fail_stale_trials(study)
    state = budget(study)
    if state.waiting or not state.full(n_trials):
      # A diverged trial is FAILED and the search goes on; any other error stops this worker.
      study.optimize(objective, n_trials=1, catch=(NonFiniteError, SurplusTrial))
      ran += 1
    elif state.running and heartbeats:
      time.sleep(poll_s)  # Another worker's trial: finishes, or goes stale and is retried.
    else:
      break
  else:
    logging.info("HPO: --timeout_s reached after %d trials in this worker.", ran)
  return ran


def trial_summary(study: optuna.study.Study) -> dict[str, int]:
  counts: dict[str, int] = {}
  for t in study.get_trials(deepcopy=False):
    counts[t.state.name] = counts.get(t.state.name, 0) + 1
  return counts
