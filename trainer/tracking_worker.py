"""The MLflow tracking thread behind `tracking.RunTracker`: it owns the MLflow client, creates
or reopens the run, and sends queued records in order, retrying with backoff while the store
fails. Only process 0 starts one.

Metrics are held and sent together, at most once every `settings.metrics_every_s` (the first
ones at once): a `log_batch` costs about the same for 10 metrics as for 100 (5 to 10 ms of
Python on a SQLite store, under the GIL the training loop needs), so one call per logging step
was ~6% of a 1.5 ms CPU step logged every 100 steps (docs/benchmarks.md). Any other record
sends everything held before it, in order; `finish` sends all.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterable

from absl import logging

from trainer.tracking import (
  PARAM_VALUE_CHARS,
  TrackingSettings,
  TrackingSummary,
  get_or_create_experiment,
  read_run_file,
  write_run_file,
)

# MLflow's per-call limits (mlflow/utils/validation.py).
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100
# Seconds between reconnection attempts: doubles from the first to the last.
_RETRY_BACKOFF_S = (1.0, 30.0)


class Worker(threading.Thread):
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
    # When held metrics are next sent (time.monotonic()); the first ones go at once.
    self._metrics_due = 0.0
    # When a failed send is next retried, or None.
    self._retry_at: float | None = None

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
      with contextlib.suppress(queue.Empty):
        self._drain_queue(block_s=self._wait_s())
      if not self._send_due():
        continue
      sends_metrics = any(kind == "metrics" for kind, _ in self._pending)
      if self._send_pending():
        delay, self._retry_at = _RETRY_BACKOFF_S[0], None
        if sends_metrics:
          self._metrics_due = time.monotonic() + self.settings.metrics_every_s
        if self._finishing and not self._pending:
          break
      else:
        if self._finishing:
          break  # One last attempt failed; end() reports what is left.
        self._retry_at = time.monotonic() + delay
        delay = min(2 * delay, _RETRY_BACKOFF_S[1])
    self._done.set()

  def _send_due(self) -> bool:
    """Whether to send the pending records now (see the module docstring)."""
    if self._finishing:
      return True
    if not self._pending:
      return False
    now = time.monotonic()
    if self._retry_at is not None:
      return now >= self._retry_at
    if any(kind != "metrics" for kind, _ in self._pending):
      return True
    return now >= self._metrics_due

  def _wait_s(self) -> float | None:
    """How long to wait for more records before `_send_due` may change; None: until one comes."""
    if not self._pending:
      return None
    due = self._retry_at if self._retry_at is not None else self._metrics_due
    return max(0.0, due - time.monotonic())

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
        client.set_tag(run_id, "resume.changed_params", note[:PARAM_VALUE_CHARS])
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
