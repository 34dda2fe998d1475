"""The MLflow side of hyperparameter search: one parent run per study, one child run per trial.

A trial's child run is created here, before training, and its identity written to the trial
workdir's `mlflow_run.json`, so the trainer (trainer/tracking.py) continues that run and logs
everything a training run logs into it. A store that fails only warns: the search goes on
untracked.
"""

from __future__ import annotations

import dataclasses
import time

import ml_collections
from absl import logging

from trainer import tracking

# The study's user attribute that names its MLflow parent run (shared by all workers).
_PARENT_ATTR = "mlflow_parent_run_id"
# Tries at reaching the store when the worker starts.
_START_ATTEMPTS = 3
# How long a worker that did not create the study waits for its creator to name the parent run.
_PARENT_WAIT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Lineage:
  study: str
  sampler: str
  pruner: str
  seed: int
  storage: str


class StudyTracker:
  """MLflow runs of one study in this worker. Every method warns instead of raising."""

  def __init__(self, config: ml_collections.ConfigDict, lineage: Lineage):
    self.settings = tracking.resolve_settings(config)
    self.lineage = lineage
    self._client = None
    self.experiment_id: str | None = None
    self.parent_run_id: str | None = None
    self._warned = False

  def _warn(self, what: str, error: Exception) -> None:
    if not self._warned:
      self._warned = True
      logging.warning(
        "MLflow (%s) failed to %s: %s; the search goes on.", self.settings.uri, what, error
      )

  def start(self, study, storage, created: bool = True) -> None:
    """Finds or creates the study's parent run (the study's user attrs name it).

    Only the worker that `created` the study creates it: the others wait (up to
    _PARENT_WAIT_S) for the study to name it, since a user attribute is last-writer-wins and
    two workers that both create one cannot tell which the study keeps. A worker that waits in
    vain (its creator tracks nothing, or died) creates one itself."""
    if not self.settings.enabled:
      return
    if not created:
      _wait_for_parent(study)
    for attempt in range(_START_ATTEMPTS):
      if self._try_start(study, storage, last=attempt == _START_ATTEMPTS - 1):
        return
      time.sleep(1.0 + attempt)  # Workers starting together race to create the store's tables.

  def _try_start(self, study, storage, last: bool) -> bool:
    try:
      from mlflow import MlflowClient

      self._client = MlflowClient(tracking_uri=self.settings.uri)
      self.experiment_id = tracking.get_or_create_experiment(self._client, self.settings)
      self.parent_run_id = study.user_attrs.get(_PARENT_ATTR)
      if self.parent_run_id is None:
        run = self._client.create_run(
          self.experiment_id, run_name=f"hpo-{self.lineage.study}", tags=self._tags()
        )
        study.set_user_attr(_PARENT_ATTR, run.info.run_id)
        # Two workers may have created one each at once: keep the one the study names.
        winner = _reload_user_attrs(study, storage).get(_PARENT_ATTR)
        if winner != run.info.run_id:
          self._client.delete_run(run.info.run_id)
        self.parent_run_id = winner
      return True
    except Exception as e:  # Store errors of any kind.
      if last:
        self._warn("create the study's parent run", e)
      self._client = None
      return False

  def _tags(self) -> dict[str, str]:
    lineage = self.lineage
    return {
      "hpo.study": lineage.study,
      "hpo.sampler": lineage.sampler,
      "hpo.pruner": lineage.pruner,
      "hpo.seed": str(lineage.seed),
      "hpo.storage": lineage.storage,
    }

  def start_trial(self, number: int, params: dict, workdir: str) -> None:
    """Creates the trial's child run and writes `<workdir>/mlflow_run.json` for the trainer."""
    if self._client is None:
      return
    tags = {
      **self._tags(),
      "hpo.trial": str(number),
      **{f"hpo.param.{k}": str(v) for k, v in params.items()},
    }
    if self.parent_run_id:
      tags["mlflow.parentRunId"] = self.parent_run_id
    try:
      run = self._client.create_run(
        self.experiment_id, run_name=f"{self.lineage.study}-trial-{number}", tags=tags
      )
      tracking.write_run_file(workdir, self.settings.uri, self.experiment_id, run.info.run_id)
    except Exception as e:  # Store errors of any kind.
      self._warn(f"create the run of trial {number}", e)

  def tag_trial(self, workdir: str, tags: dict[str, object]) -> None:
    """Tags the trial's run (e.g. its Optuna state, or that it is the best)."""
    record = tracking.read_run_file(workdir)
    if self._client is None or record is None:
      return
    try:
      for key, value in tags.items():
        self._client.set_tag(record["run_id"], key, str(value))
    except Exception as e:  # Store errors of any kind.
      self._warn("tag a trial's run", e)

  def finish(self, tags: dict[str, object], artifact_dir: str | None) -> None:
    """Tags the parent run with the study's result and logs the study directory's summary."""
    if self._client is None or self.parent_run_id is None:
      return
    try:
      for key, value in tags.items():
        self._client.set_tag(self.parent_run_id, key, str(value))
      if artifact_dir:
        self._client.log_artifacts(self.parent_run_id, artifact_dir, "hpo")
      self._client.set_terminated(self.parent_run_id, "FINISHED")
    except Exception as e:  # Store errors of any kind.
      self._warn("update the study's parent run", e)


def _wait_for_parent(study) -> None:
  """Returns once the study names its parent run, or at once when no creator is about to: the
  study already has trials (it was run untracked), the wait ran out, or the storage failed."""
  deadline = time.monotonic() + _PARENT_WAIT_S
  try:
    while _PARENT_ATTR not in study.user_attrs:  # Read from the storage on every access.
      if study.trials:
        return
      if time.monotonic() > deadline:
        logging.warning(
          "Study %s names no MLflow parent run after %.0f s; this worker creates one.",
          study.study_name,
          _PARENT_WAIT_S,
        )
        return
      time.sleep(0.25)
  except Exception:  # Store errors of any kind: start() retries and warns.
    return


def _reload_user_attrs(study, storage) -> dict:
  import optuna

  return optuna.load_study(study_name=study.study_name, storage=storage).user_attrs
