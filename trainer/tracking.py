"""MLflow tracking of a training run, which never takes training down.

One `RunTracker` per `train_and_evaluate`, built on every process; only process 0 talks to MLflow.
Calls from the training loop only enqueue: a background thread connects to the store, creates
(or, on resume, reopens) the run and sends everything in order, metrics batched with
`MlflowClient.log_batch`. When the store is unreachable or locked the thread warns once, keeps
what it holds and retries with backoff; `end()` waits a bounded time for it and returns a
`TrackingSummary` saying what was not logged.

Where runs go (MLflow's conventions first): `MLFLOW_TRACKING_URI`, else `config.tracking.uri`, else
`sqlite:///<project root>/mlflow.db`, the store `mlflow ui` finds when started from the project
root. The experiment is `MLFLOW_EXPERIMENT_NAME`, else `config.tracking.experiment`.

The run's identity lives in `<workdir>/mlflow_run.json` = {"tracking_uri", "experiment_id",
"run_id"}: a resumed run continues that MLflow run, a run whose file names another store starts a
new one. Other tools read this file (the registry, HPO writes it to pre-create trial runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import threading
import time
from collections.abc import Iterable

import jax
import ml_collections
from absl import logging

RUN_FILE = "mlflow_run.json"
# How the last training run in a workdir ended: {"status", "reason", "time"}.
OUTCOME_FILE = "run_outcome.json"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRACKING_URI = f"sqlite:///{os.path.join(PROJECT_ROOT, 'mlflow.db')}"
# MLflow's per-call limits (mlflow/utils/validation.py).
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_CHARS = 6000
# Seconds between reconnection attempts: doubles from the first to the last.
_RETRY_BACKOFF_S = (1.0, 30.0)


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
      self._worker = _Worker(self.settings, workdir, run_name)
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
      self._worker.put("params", {k: str(v)[:_PARAM_VALUE_CHARS] for k, v in params.items()})

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
    self._worker.put("tags", {"run.outcome": reason[:_PARAM_VALUE_CHARS]})
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


class _Worker(threading.Thread):
  """Owns the MLflow client; sends queued records in order, retrying while the store fails."""

  def __init__(self, settings: TrackingSettings, workdir: str, run_name: str):
    super().__init__(name="mlflow-tracking", daemon=True)
    self.settings, self.workdir, self.run_name = settings, workdir, run_name
    self._queue: queue.Queue = queue.Queue()
    self._pending: list[tuple[str, object]] = []
    self._client = None
    self._run_id: str | None = None
    # Params the run already had when this process reopened it (a resume).
    self._earlier_params: dict[str, str] = {}
    self._error: str | None = None
    self._warned = False
    # Records the store refused for good, by kind.
    self._dropped: dict[str, int] = {}
    self._done = threading.Event()
    self._finishing = False

  def put(self, kind: str, payload: object) -> None:
    self._queue.put((kind, payload))

  def finish(self, timeout_s: float) -> TrackingSummary:
    self._queue.put(("finish", None))
    self._done.wait(timeout_s)
    not_logged = dict(self._dropped)
    # After a timeout the thread may still hold records; count them as lost (it is a daemon).
    for kind, payload in self._pending + list(self._queue.queue):
      if kind != "finish":
        self._count(not_logged, kind, payload)
    if not_logged:
      logging.warning("MLflow tracking: not logged: %s (%s)", not_logged, self._error)
    return TrackingSummary(True, self.settings.uri, self._run_id, not_logged, self._error)

  def run(self) -> None:
    delay = _RETRY_BACKOFF_S[0]
    while True:
      timeout = delay if self._pending else None
      with contextlib.suppress(queue.Empty):
        self._drain_queue(block_s=timeout)
      if self._send_pending():
        delay = _RETRY_BACKOFF_S[0]
        if self._finishing and not self._pending:
          break
      else:
        if self._finishing:
          break  # One last attempt failed; end() reports what is left.
        delay = min(2 * delay, _RETRY_BACKOFF_S[1])
    self._done.set()

  def _drain_queue(self, block_s: float | None) -> None:
    kind, payload = self._queue.get(timeout=block_s)
    items = [(kind, payload)]
    while True:
      try:
        items.append(self._queue.get_nowait())
      except queue.Empty:
        break
    for kind, payload in items:
      if kind == "finish":
        self._finishing = True
      else:
        self._pending.append((kind, payload))

  def _send_pending(self) -> bool:
    """Sends pending records in order; False (records kept) when the store fails."""
    from mlflow.exceptions import MlflowException

    try:
      if self._run_id is None:
        self._connect()
      while self._pending:
        taken = self._taken_together()
        try:
          self._send(self._pending[:taken])
        except MlflowException as e:
          if e.error_code != "INVALID_PARAMETER_VALUE":
            raise
          # The store refuses these records (e.g. a param changed on resume): drop, not retry.
          logging.warning("MLflow refused %s: %s", self._pending[0][0], str(e).splitlines()[0])
          for kind, payload in self._pending[:taken]:
            self._count(self._dropped, kind, payload)
        del self._pending[:taken]
    except Exception as e:
      self._error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
      if not self._warned:
        self._warned = True
        logging.warning(
          "MLflow tracking to %s failed (%s); training continues and tracking retries.",
          self.settings.uri,
          self._error,
        )
      return False
    return True

  def _taken_together(self) -> int:
    """How many leading pending records go in one call: consecutive metrics, up to a batch."""
    if self._pending[0][0] != "metrics":
      return 1
    taken, count = 0, 0
    for kind, payload in self._pending:
      if kind != "metrics" or (taken and count + len(payload) > _METRICS_PER_BATCH):
        break
      taken, count = taken + 1, count + len(payload)
    return taken

  @staticmethod
  def _count(counts: dict[str, int], kind: str, payload) -> None:
    n = len(payload) if kind in ("metrics", "params", "tags") else 1
    counts[kind] = counts.get(kind, 0) + n

  def _connect(self) -> None:
    from mlflow import MlflowClient  # Deferred: a ~2 s import, off the training thread.

    self._client = client = MlflowClient(tracking_uri=self.settings.uri)
    previous = read_run_file(self.workdir)
    if previous and previous["tracking_uri"] == self.settings.uri:
      client.update_run(previous["run_id"], status="RUNNING")
      self._run_id = previous["run_id"]
      self._earlier_params = client.get_run(self._run_id).data.params
      logging.info("MLflow: continuing run %s in %s", self._run_id, self.settings.uri)
      return
    experiment_id = get_or_create_experiment(client, self.settings)
    run = client.create_run(experiment_id, run_name=self.run_name)
    write_run_file(self.workdir, self.settings.uri, experiment_id, run.info.run_id)
    self._run_id = run.info.run_id
    logging.info("MLflow: run %s in %s", self._run_id, self.settings.uri)

  def _send(self, records: list[tuple[str, object]]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client, run_id = self._client, self._run_id
    kind, payload = records[0]
    if kind == "metrics":
      metrics = [Metric(*m) for _, batch in records for m in batch]
      for batch in _chunks(metrics, _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch)
    elif kind == "params":
      # MLflow params are immutable: a resumed run logs only new ones and tags what changed.
      earlier = self._earlier_params
      changed = {k: v for k, v in payload.items() if k in earlier and earlier[k] != v}
      new = [(k, v) for k, v in payload.items() if k not in earlier]
      for batch in _chunks(new, _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in batch])
      if changed:
        note = "; ".join(f"{k}: {earlier[k]} -> {v}" for k, v in sorted(changed.items()))
        client.set_tag(run_id, "resume.changed_params", note[:_PARAM_VALUE_CHARS])
    elif kind == "tags":
      for batch in _chunks(list(payload.items()), _PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in batch])
    elif kind == "artifact":
      local_path, artifact_path = payload
      if os.path.isdir(local_path):
        client.log_artifacts(run_id, local_path, artifact_path)
      elif os.path.exists(local_path):
        client.log_artifact(run_id, local_path, artifact_path)
    elif kind == "text":
      client.log_text(run_id, *payload)
    elif kind == "status":
      client.set_terminated(run_id, status=payload)


def _chunks(items: list, size: int) -> Iterable[list]:
  return (items[i : i + size] for i in range(0, len(items), size))
