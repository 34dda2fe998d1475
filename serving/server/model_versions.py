"""One model's versions: loads, warms up, hot-swaps and unloads those under its base path.

The policy is TF Serving's default (`latest 1`, availability preserving): the largest numeric
version directory is loaded, its warmup records are replayed, and only then is it served; the
version it replaces is unloaded afterwards. A version whose load or warmup fails is reported with
its error (state END) and never served; the previous version keeps serving. Requests hold a
reference to the version they resolved, so unloading never fails a request in flight.

Request fields (model name, version, label, signature) are only ever looked up in maps built from
the configured base path: nothing in a request becomes a filesystem path.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import grpc
from absl import logging

from serving import contract
from serving.server.batching import BatchScheduler
from serving.server.errors import ServingError
from serving.server.loaded_version import LoadedVersion
from serving.server.model_config import ModelConfig, VersionPolicy

# tensorflow.serving.ModelVersionStatus.State
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclasses.dataclass
class VersionStatus:
  version: int
  state: str
  # Empty when OK.
  error: str = ""


@dataclasses.dataclass(frozen=True)
class LoadRetry:
  """TF Serving's --max_num_load_retries and --load_retry_interval_micros: a version whose load
  failed (say, polled while it was still being copied) is tried again this often."""

  max_retries: int = 5
  interval_seconds: float = 60.0

  def due(self, failures: int, last_failure: float) -> bool:
    return failures <= self.max_retries and time.monotonic() - last_failure >= self.interval_seconds


@dataclasses.dataclass(frozen=True)
class Warmup:
  """TF Serving's --enable_model_warmup and --num_request_iterations_for_warmup: whether a
  loading version replays its warmup records before it is served, and how often each."""

  enabled: bool = True
  iterations: int = 1


class ModelVersions:
  """Serves one model: the versions under its base path that its version policy chooses.

  Call `poll()` once to load what is there (blocking), then `start()` to poll every
  `poll_wait_seconds` in a background thread; `stop()` ends polling. Lookups are thread-safe.
  """

  def __init__(
    self,
    config: ModelConfig,
    *,
    poll_wait_seconds: float = 1.0,
    batch_scheduler: BatchScheduler | None = None,
    load_retry: LoadRetry = LoadRetry(),
    warmup: Warmup = Warmup(),
  ):
    self.name = config.name
    self.base_path = os.path.abspath(config.base_path)
    self.poll_wait_seconds = poll_wait_seconds
    self.batch_scheduler = batch_scheduler
    self.load_retry = load_retry
    self.warmup = warmup
    # version -> (failed loads, monotonic time of the last) while the version is on disk.
    self._failures: dict[int, tuple[int, float]] = {}
    self.version_policy = config.version_policy
    self.version_labels = dict(config.version_labels)
    self._lock = threading.Lock()
    # One poll at a time: the poller thread and a config reload may both poll.
    self._poll_lock = threading.Lock()
    self._served: dict[int, LoadedVersion] = {}
    self._status: dict[int, VersionStatus] = {}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # Lookups (any thread).

  def resolve(self, name: str, version: int | None = None, label: str = "") -> LoadedVersion:
    """The served version for a request's model spec. Raises ServingError (NOT_FOUND for an
    unknown model or version, INVALID_ARGUMENT for an unknown label)."""
    if name != self.name:
      raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {name!r}")
    if label:
      version = self._labelled_version(label)
    with self._lock:
      if version is None:
        if not self._served:
          raise ServingError(
            grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})"
          )
        return self._served[max(self._served)]
      if version not in self._served:
        raise ServingError(
          grpc.StatusCode.NOT_FOUND,
          f"Servable not found for request: Specific({name}, {version}); available: "
          f"{sorted(self._served)}",
        )
      return self._served[version]

  def status(self, name: str, version: int | None = None, label: str = "") -> list[VersionStatus]:
    """Status of every known version (or one). Raises ServingError like `resolve`."""
    if name != self.name:
      raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
    if label:
      version = self._labelled_version(label)
    with self._lock:
      statuses = [dataclasses.replace(s) for _, s in sorted(self._status.items())]
    if version is not None:
      statuses = [s for s in statuses if s.version == version]
      if not statuses:
        raise ServingError(
          grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}"
        )
    return statuses

  def _labelled_version(self, label: str) -> int:
    labels = self.version_labels  # One read: a reload may swap the dict meanwhile.
    if label not in labels:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Unrecognized servable version label: {label}; model {self.name} has labels "
        f"{sorted(labels)}",
      )
    return labels[label]

  def unavailable_labels(self, labels: dict[str, int]) -> dict[str, int]:
    """The labels of `labels` that name a version not served now."""
    with self._lock:
      return {label: v for label, v in labels.items() if v not in self._served}

  # Configuration (from a config reload).

  def set_version_policy(self, policy: VersionPolicy) -> None:
    """Applies `policy` from the next poll on."""
    self.version_policy = policy

  def set_version_labels(self, labels: dict[str, int]) -> None:
    """Points labels at versions (a reload checked they are served); logs each label moved."""
    old, self.version_labels = self.version_labels, dict(labels)  # Lookups see old or new.
    for label in sorted(set(old) | set(labels)):
      if old.get(label) != labels.get(label):
        logging.info(
          "Label %s of model %s: %s -> %s",
          label,
          self.name,
          old.get(label, "(none)"),
          labels.get(label, "(removed)"),
        )

  # Polling.

  def start(self) -> None:
    self._thread = threading.Thread(
      target=self._poll_loop, name=f"model-poller-{self.name}", daemon=True
    )
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)

  def unload_all(self, reason: str) -> None:
    """Stops polling and unloads every version (the model left the config)."""
    self.stop()
    with self._poll_lock:
      self._unload(set(self._served), reason=reason)

  def _poll_loop(self) -> None:
    while not self._stop.wait(self.poll_wait_seconds):
      try:
        self.poll()
      except Exception:  # The poller must outlive any one bad version or filesystem hiccup.
        logging.exception("Polling %s failed", self.base_path)

  def poll(self) -> None:
    """One pass: load the versions the policy aspires to (newest first), then unload the others
    once one aspired version serves; unload versions removed from disk."""
    with self._poll_lock:
      self._poll()

  def _poll(self) -> None:
    try:
      on_disk = contract.versions_in(os.listdir(self.base_path))
    except OSError as e:
      logging.warning("Cannot list --model_base_path=%s: %s", self.base_path, e)
      on_disk = set()
    self._unload(set(self._served) - on_disk, reason="removed from disk")
    with self._lock:
      for v in set(self._status) - on_disk:  # Forget failed or unloaded versions now gone.
        if v not in self._served:
          del self._status[v]
          self._failures.pop(v, None)
    failed = {v for v in self._failures if not self.load_retry.due(*self._failures[v])}
    candidates = on_disk - failed
    if not candidates:
      return
    aspired = self.version_policy.aspired(candidates)
    for version in sorted(aspired - set(self._served), reverse=True):
      self._load(version)
    if aspired & set(self._served):  # Availability preserving: never unload the last one.
      self._unload(
        set(self._served) - aspired, reason=f"not in the aspired versions {sorted(aspired)}"
      )

  def _load(self, version: int) -> bool:
    path = contract.version_dir(self.base_path, version)
    self._set_status(version, LOADING)
    start = time.perf_counter()
    try:
      loaded = LoadedVersion(self.name, version, path, self.batch_scheduler)
      warmup_count = loaded.warm_up(self.warmup.iterations) if self.warmup.enabled else 0
    except Exception as e:  # Any failure of a user's SavedModel is that version's error.
      message = f"{type(e).__name__}: {str(e).strip() or e!r}"
      failures = self._failures.get(version, (0, 0.0))[0] + 1
      self._failures[version] = (failures, time.monotonic())
      logging.error(
        "Loading %s version %d failed (attempt %d of %d): %s",
        self.name,
        version,
        failures,
        self.load_retry.max_retries + 1,
        message,
      )
      self._set_status(version, END, message[:2000])
      return False
    self._failures.pop(version, None)
    with self._lock:
      self._served[version] = loaded
      self._status[version] = VersionStatus(version, AVAILABLE)
    logging.info(
      "Serving %s version %d (%s) after %.1f s",
      self.name,
      version,
      f"{warmup_count} warmup requests" if self.warmup.enabled else "warmup disabled",
      time.perf_counter() - start,
    )
    return True

  def _unload(self, versions: set[int], reason: str) -> None:
    for version in sorted(versions):
      self._set_status(version, UNLOADING)
      with self._lock:
        self._served.pop(version, None)  # Requests in flight keep their own reference.
        self._status[version] = VersionStatus(version, END)
      logging.info("Unloaded %s version %d (%s)", self.name, version, reason)

  def _set_status(self, version: int, state: str, error: str = "") -> None:
    with self._lock:
      self._status[version] = VersionStatus(version, state, error)
