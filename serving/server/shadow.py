"""Shadow (mirrored) requests: a Predict's, Classify's or Regress's copy run on another version
label after the primary answered, on a few worker threads fed by a bounded queue. A copy runs
the signature the primary ran on the same input tensors (a Classify's serialized tf.Examples
included), so every RPC mirrors the same way.

The primary never waits for its shadow and never sees its errors: `submit` only queues (a full
queue drops the copy, counted as `serving_shadow_requests{outcome="dropped"}`), and a shadow's
outcome is counted (`ok` / `error`) and, when its primary was logged, logged under the
primary's request id with role "shadow".
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import grpc
from absl import logging

from serving.server import log_format
from serving.server.errors import ServingError
from serving.server.metrics import Metrics
from serving.server.model_config import LoggingConfig
from serving.server.prediction_logger import LogEntry, PredictionLogger
from serving.server.request_context import RequestContext

DEFAULT_WORKERS = 2
DEFAULT_QUEUE_SIZE = 64


@dataclasses.dataclass(frozen=True, slots=True)
class ShadowJob:
  model_name: str
  signature_name: str
  label: str
  request_id: str
  inputs: dict
  log_config: LoggingConfig | None
  rpc: str = "Predict"


class ShadowRunner:
  """Runs mirrored copies on `served_models` (a ServedModels). Thread-safe; `stop` ends the
  workers after the copies already queued."""

  def __init__(
    self,
    served_models,
    metrics: Metrics,
    logger: PredictionLogger | None,
    *,
    workers: int = DEFAULT_WORKERS,
    queue_size: int = DEFAULT_QUEUE_SIZE,
  ):
    self.models = served_models
    self.metrics = metrics
    self.logger = logger
    self._queue: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=queue_size)
    self._threads = [
      threading.Thread(target=self._run, name=f"shadow-{i}", daemon=True) for i in range(workers)
    ]
    for thread in self._threads:
      thread.start()

  def submit(
    self,
    spec,
    context: RequestContext,
    log_config: LoggingConfig | None,
    label: str,
    rpc: str = "Predict",
  ):
    """Queues the copy of the request of `context` (an `rpc`) to `label`; never blocks.
    `log_config`: where to log the shadow's result (None: its primary was not logged, neither
    is it)."""
    job = ShadowJob(
      spec.name,
      context.signature_name or spec.signature_name,
      label,
      context.request_id,
      dict(context.inputs),
      log_config,
      rpc,
    )
    try:
      self._queue.put_nowait(job)
    except queue.Full:
      self.metrics.observe_shadow(spec.name, "dropped")

  def stop(self, timeout_s: float = 5.0) -> None:
    for _ in self._threads:
      try:
        self._queue.put(None, timeout=timeout_s)
      except queue.Full:
        return  # Daemon threads: they end with the process.
    for thread in self._threads:
      thread.join(timeout_s)

  def _run(self) -> None:
    while (job := self._queue.get()) is not None:
      self._shadow(job)

  def run_copy(self, job: ShadowJob) -> tuple[int, str, dict]:
    """Runs a copy on the served models: (version, signature name, outputs). Raises
    ServingError; the router's runner (serving/router) overrides this to call its backend."""
    loaded = self.models.resolve(job.model_name, None, job.label)
    signature = loaded.signature(job.signature_name)
    return loaded.version, signature.name, loaded.run(signature.name, job.inputs, ())

  def _shadow(self, job: ShadowJob) -> None:
    start_us = time.time_ns() // 1000
    start = time.perf_counter()
    outputs, version, signature_name = {}, 0, job.signature_name
    try:
      version, signature_name, outputs = self.run_copy(job)
      code = grpc.StatusCode.OK
    except ServingError as e:
      code = e.code
    except Exception:  # A shadow's bug is logged, never raised into anything.
      logging.exception("Shadow of request %s on %s failed", job.request_id, job.label)
      code = grpc.StatusCode.INTERNAL
    seconds = time.perf_counter() - start
    self.metrics.observe_shadow(job.model_name, "ok" if code == grpc.StatusCode.OK else "error")
    if job.log_config is None or self.logger is None:
      return
    meta = log_format.RecordMetadata(
      request_id=job.request_id,
      time_us=start_us,
      model_name=job.model_name,
      version=version,
      version_label=job.label,
      latency_us=int(seconds * 1e6),
      status_code=code.value[0],
      role="shadow",
      rpc=job.rpc,
    )
    entry = LogEntry(
      job.log_config,
      job.inputs,
      outputs,
      meta,
      signature_name or "serving_default",
      (None, job.label),
    )
    self.logger.submit(entry)
