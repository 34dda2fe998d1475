"""Prometheus metrics of the model server: requests by outcome, latency, per model and version."""

from __future__ import annotations

import os

import prometheus_client as prom

# Seconds; a digits request on CPU takes ~1 ms, a language model's `generate` up to seconds.
BATCH_SIZE_BUCKETS = tuple(2**i for i in range(11))
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
  """One registry per server (no global state); thread-safe, as prometheus_client is."""

  def __init__(self, model_names: list[str] = ()):
    self.model_names = frozenset(model_names)
    self._children: dict[tuple, object] = {}  # See _child.
    self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter(
      "serving_requests",
      "Requests by API (grpc, rest), method, model, version and status code.",
      ["api", "method", "model", "version", "code"],
      registry=self.registry,
    )
    self.latency = prom.Histogram(
      "serving_request_latency_seconds",
      "Request latency in seconds, from request parsed to response built.",
      ["api", "method", "model", "version"],
      buckets=LATENCY_BUCKETS,
      registry=self.registry,
    )

    self.batch_size = prom.Histogram(
      "serving_batch_size",
      "Rows of requests merged into one run by server-side batching (--enable_batching).",
      ["model", "version"],
      buckets=BATCH_SIZE_BUCKETS,
      registry=self.registry,
    )
    self.padding_rows = prom.Counter(
      "serving_batch_padding_rows",
      "Rows added to batches to reach one of allowed_batch_sizes.",
      ["model", "version"],
      registry=self.registry,
    )

    self.log_records = prom.Counter(
      "serving_prediction_log_records",
      "Prediction log records by outcome: written, dropped (the writer's queue was full), "
      "failed (could not be written).",
      ["model", "outcome"],
      registry=self.registry,
    )
    self.shadow_requests = prom.Counter(
      "serving_shadow_requests",
      "Mirrored (shadow) requests by outcome: ok, error, dropped (the shadow queue was full).",
      ["model", "outcome"],
      registry=self.registry,
    )
    self.traffic_config_loads = prom.Counter(
      "serving_traffic_config_loads",
      "Reads of --traffic_config_file by result: applied, refused (the previous policy stays).",
      ["result"],
      registry=self.registry,
    )

  def _known(self, model: str) -> str:
    # Names from requests are not labels: an attacker could grow the series without bound.
    return model if model in self.model_names else "unknown"

  def observe_log_record(self, model: str, outcome: str) -> None:
    self._child(self.log_records, self._known(model), outcome).inc()

  def observe_shadow(self, model: str, outcome: str) -> None:
    self._child(self.shadow_requests, self._known(model), outcome).inc()

  def set_model_names(self, model_names: list[str]) -> None:
    """The configured models, whose names may be label values (a config reload changes them)."""
    self.model_names = frozenset(model_names)

  def observe_batch(self, model: str, version: int, rows: int, padded_rows: int) -> None:
    self._child(self.batch_size, model, str(version)).observe(rows)
    if padded_rows > rows:
      self._child(self.padding_rows, model, str(version)).inc(padded_rows - rows)

  def observe(
    self, api: str, method: str, model: str, version: int | None, code: str, seconds: float
  ) -> None:
    model = self._known(model)
    version_label = "" if version is None else str(version)
    self._child(self.requests, api, method, model, version_label, code).inc()
    self._child(self.latency, api, method, model, version_label).observe(seconds)

  def _child(self, metric, *label_values: str):
    """`metric.labels(*label_values)`, cached: `labels()` validates and locks on every call
    (~4 us), a dict lookup does not. Racing threads store the same child (prometheus_client
    keeps one per label values)."""
    key = (id(metric), label_values)
    child = self._children.get(key)
    if child is None:
      child = self._children[key] = metric.labels(*label_values)
    return child

  def exposition(self) -> bytes:
    """The text exposition; with --num_workers, summed over every worker (prometheus_client's
    multiprocess mode, which the supervisor turns on for its workers)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
      from prometheus_client import multiprocess

      registry = prom.CollectorRegistry()
      multiprocess.MultiProcessCollector(registry)
      return prom.generate_latest(registry)
    return prom.generate_latest(self.registry)
