"""MLflow tracking of a training run, which never takes training down.

One `RunTracker` per `train_and_evaluate`, built on every process; only process 0 talks to MLflow.
Calls from the training loop only enqueue: a background thread (trainer/tracking_worker.py)
connects to the store, creates (or, on resume, reopens) the run and sends everything in order,
metrics together in one `MlflowClient.log_batch` at most every `config.tracking.metrics_every_s`.
When the store is unreachable or locked the thread warns once, keeps what it holds and retries
with backoff; `end()` waits a bounded time for it and returns a `TrackingSummary` saying what
was not logged.

Where runs go (MLflow's conventions first): `MLFLOW_TRACKING_URI`, else `config.tracking.uri`, else
`sqlite:///<project root>/mlflow.db`, the store `mlflow ui` finds when started from the project
root. The experiment is `MLFLOW_EXPERIMENT_NAME`, else `config.tracking.experiment`.

The run's identity lives in `<workdir>/mlflow_run.json` = {"tracking_uri", "experiment_id",
"run_id"}: a resumed run continues that MLflow run, a run whose file names another store starts a
new one. Other tools read this file (the registry, HPO writes it to pre-create trial runs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
from absl import logging

RUN_FILE = "mlflow_run.json"
# How the last training run in a workdir ended: {"status", "reason", "time"}.
OUTCOME_FILE = "run_outcome.json"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRACKING_URI = f"sqlite:///{os.path.join(PROJECT_ROOT, 'mlflow.db')}"
# MLflow's longest param value (mlflow/utils/validation.py); longer values are cut.
PARAM_VALUE_CHARS = 6000


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
  enabled: bool
  uri: str
  experiment: str
  # Where a new experiment keeps artifacts; None is MLflow's default (./mlruns), except for a
  # SQLite store, whose artifacts go next to the database file.
  artifact_location: str | None
  # How long end() waits for pending records before giving up on them.
  flush_timeout_s: float
  # Seconds between metric uploads; the metrics logged in between go in one call.
  metrics_every_s: float


def resolve_settings(config: ml_collections.ConfigDict) -> TrackingSettings:
  """The store and experiment for `config`: MLflow's environment variables win over the config."""
  tracking = config.tracking
  uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri or DEFAULT_TRACKING_URI
  artifacts = tracking.artifact_location or None
  if artifacts is None and uri.startswith("sqlite:///"):
    artifacts = os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///") :])), "mlruns")
  return TrackingSettings(
    enabled=bool(tracking.enabled),
    uri=uri,
    experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.experiment,
    artifact_location=artifacts,
    flush_timeout_s=float(tracking.flush_timeout_s),
    metrics_every_s=float(tracking.metrics_every_s),
  )


def read_run_file(workdir: str) -> dict | None:
  """The {"tracking_uri", "experiment_id", "run_id"} record of the workdir's run, or None."""
  try:
    with open(os.path.join(workdir, RUN_FILE)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if {"tracking_uri", "experiment_id", "run_id"} <= set(record) else None


def write_run_file(workdir: str, tracking_uri: str, experiment_id: str, run_id: str) -> None:
  """Writes the run record atomically (temp file + os.replace)."""
  os.makedirs(workdir, exist_ok=True)
  record = {"tracking_uri": tracking_uri, "experiment_id": experiment_id, "run_id": run_id}
  _write_json(os.path.join(workdir, RUN_FILE), record)


def read_outcome(workdir: str) -> dict | None:
  """{"status", "reason", "time"} of the workdir's last training run, or None."""
  try:
    with open(os.path.join(workdir, OUTCOME_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, record: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)


def get_or_create_experiment(client, settings: TrackingSettings) -> str:
  """The id of `settings.experiment`, created (with its artifact location) when missing."""
  experiment = client.get_experiment_by_name(settings.experiment)
  if experiment is not None:
    return experiment.experiment_id
  location = None
  if settings.artifact_location:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.experiment)
    location = os.path.join(settings.artifact_location, slug)
  try:
    return client.create_experiment(settings.experiment, artifact_location=location)
  except Exception:
    # Another process (an HPO worker, a second job) created it at the same moment.
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
      raise
    return experiment.experiment_id


@dataclasses.dataclass(frozen=True)
class TrackingSummary:
  """What tracking did, for the run summary."""

  enabled: bool
  tracking_uri: str = ""
  run_id: str | None = None
  # Records that never reached the store, by kind (metrics, params, tags, artifacts, status).
  not_logged: dict[str, int] = dataclasses.field(default_factory=dict)
  error: str | None = None

  def describe(self) -> str:
    if not self.enabled:
      return "mlflow: tracking disabled (config.tracking.enabled=False)"
    if not self.not_logged:
      return f"mlflow: run {self.run_id} in {self.tracking_uri} (mlflow ui)"
    missing = ", ".join(f"{n} {kind}" for kind, n in sorted(self.not_logged.items()))
    where = f"run {self.run_id}" if self.run_id else "no run"
    return f"mlflow: {where} in {self.tracking_uri}; NOT logged: {missing} ({self.error})"


class RunTracker:
  """The training run's MLflow run. Construct on every process; process 0 alone logs.

  `log_metrics`, `log_params`, `set_tags` and `log_artifact` never block on the store and never
  raise for store errors; `end` waits at most `flush_timeout_s`.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.settings = resolve_settings(config)
    self.workdir = workdir
    self._worker = None
    if self.settings.enabled and jax.process_index() == 0:
      run_name = os.path.basename(os.path.abspath(workdir).rstrip("/"))
      from trainer.tracking_worker import Worker  # Here: that module imports this one.

      self._worker = Worker(self.settings, workdir, run_name)
      self._worker.start()

  @property
  def active(self) -> bool:
    return self._worker is not None

  def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
    if self._worker:
      now = int(time.time() * 1000)
      self._worker.put("metrics", [(k, float(v), now, step) for k, v in scalars.items()])

  def log_params(self, params: dict[str, object]) -> None:
    if self._worker:
      self._worker.put("params", {k: str(v)[:PARAM_VALUE_CHARS] for k, v in params.items()})

  def set_tags(self, tags: dict[str, object]) -> None:
    if self._worker:
      self._worker.put("tags", {k: str(v) for k, v in tags.items()})

  def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
    """Logs a file or a directory (its contents) when the worker gets to it."""
    if self._worker:
      self._worker.put("artifact", (os.path.abspath(local_path), artifact_path))

  def log_text(self, text: str, artifact_file: str) -> None:
    if self._worker:
      self._worker.put("text", (text, artifact_file))

  def end(self, status: str, reason: str = "") -> TrackingSummary:
    """Ends the run as FINISHED, FAILED or KILLED after sending what is pending.

    Also records the outcome in `<workdir>/run_outcome.json` (process 0, tracking on or off),
    which the experiment report reads.
    """
    if jax.process_index() == 0:
      try:
        _write_json(
          os.path.join(self.workdir, OUTCOME_FILE),
          {"status": status, "reason": reason, "time": time.time()},
        )
      except OSError as e:
        logging.warning("Could not record the run's outcome in %s: %s", self.workdir, e)
    if not self._worker:
      return TrackingSummary(enabled=self.settings.enabled, tracking_uri=self.settings.uri)
    self._worker.put("tags", {"run.outcome": reason[:PARAM_VALUE_CHARS]})
    self._worker.put("status", status)
    return self._worker.finish(self.settings.flush_timeout_s)


def run_tags(manifest: dict) -> dict[str, object]:
  """Lineage tags from the run manifest (trainer/manifest.py)."""
  git = manifest.get("git") or {}
  devices = manifest.get("devices") or {}
  tags = {
    "mlflow.source.git.commit": git.get("commit"),
    "git.commit": git.get("commit"),
    "git.dirty": git.get("dirty"),
    "data.fingerprint": manifest.get("data_fingerprint"),
    "mesh": ",".join(f"{axis}={size}" for axis, size in (manifest.get("mesh") or {}).items()),
    "devices.platform": devices.get("platform"),
    "devices.kind": devices.get("kind"),
    "devices.count": devices.get("count"),
    "process_count": devices.get("process_count"),
    "python": manifest.get("python"),
  }
  tags.update({f"packages.{k}": v for k, v in (manifest.get("packages") or {}).items()})
  return {k: v for k, v in tags.items() if v is not None}


def log_run_start(
  tracker: RunTracker, config: ml_collections.ConfigDict, run_manifest: dict, workdir: str
) -> None:
  """Params (the flattened config), lineage tags and the manifest and config artifacts."""
  if not tracker.active:
    return
  from trainer.metrics import flatten_config

  tracker.log_params(flatten_config(config))
  tags = {**run_tags(run_manifest), "workdir": os.path.abspath(workdir)}
  if config.description:
    tags["mlflow.note.content"] = config.description  # The run's description in the MLflow UI.
  tracker.set_tags(tags)
  tracker.log_artifact(os.path.join(workdir, "manifest.json"))
  tracker.log_text(config.to_json_best_effort(indent=2), "config.json")


def write_and_log_report(tracker: RunTracker, workdir: str) -> None:
  """Writes `<workdir>/report` (mlops/report.py) and logs it; a failure only warns."""
  try:
    from mlops import report  # Deferred: matplotlib is only needed here.

    report_dir = report.write_report(workdir)
  except Exception as e:
    logging.warning("Could not write the experiment report for %s: %s", workdir, e)
    return
  tracker.log_artifact(report_dir, "report")
