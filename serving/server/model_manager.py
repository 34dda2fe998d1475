"""Loads, warms up, hot-swaps and unloads the versions of one model under a base path.

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
import functools
import os
import threading
import time

import grpc
import numpy as np
from absl import logging

from serving.server import tensors
from serving.server.batching import BatchScheduler
from serving.server.errors import ServingError
from serving.server.model_config import ModelConfig, VersionPolicy

WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
# TF Serving replays at most this many warmup records.
MAX_WARMUP_RECORDS = 1000
DEFAULT_SIGNATURE = "serving_default"

# tensorflow.serving.ModelVersionStatus.State
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  dtype: int  # tensorflow.DataType enum
  # None for an unknown rank; -1 for an unknown dimension.
  shape: tuple[int, ...] | None

  def describe(self) -> str:
    return "unknown rank" if self.shape is None else "[" + ", ".join(map(str, self.shape)) + "]"


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
  name: str
  inputs: dict[str, TensorSpec]
  outputs: dict[str, TensorSpec]

  @property
  def batchable(self) -> bool:
    """Whether every input and output leads with a batch dimension of any size."""
    specs = [*self.inputs.values(), *self.outputs.values()]
    return all(s.shape is not None and s.shape[:1] == (-1,) for s in specs)


class LoadedVersion:
  """One loaded SavedModel version. Thread-safe: `run` may be called from many threads."""

  def __init__(
    self, model_name: str, version: int, path: str, batch_scheduler: BatchScheduler | None = None
  ):
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    self.model_name = model_name
    self.version = version
    self.path = path
    self._tf = tf
    self._batch_scheduler = batch_scheduler
    self._loaded = tf.saved_model.load(path, tags=["serve"])
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
      saved_model = saved_model_pb2.SavedModel.FromString(f.read())
    meta_graph = next(
      (m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags),
      saved_model.meta_graphs[0],
    )
    # All SignatureDefs (with __saved_model_init_op), as TF Serving's GetModelMetadata returns them.
    self.signature_defs = dict(meta_graph.signature_def)
    self.signatures = {
      name: SignatureInfo(name, _specs(d.inputs), _specs(d.outputs))
      for name, d in self.signature_defs.items()
      if name in self._loaded.signatures
    }

  def signature(self, name: str) -> SignatureInfo:
    name = name or DEFAULT_SIGNATURE
    if name not in self.signatures:
      raise ServingError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f'Serving signature name: "{name}" not found in signature def; model {self.model_name} '
        f"version {self.version} has {sorted(self.signatures)}",
      )
    return self.signatures[name]

  def run(
    self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()
  ) -> dict[str, np.ndarray]:
    """Validates `inputs` against the signature and runs it (batched with other requests when
    the server batches). Raises ServingError."""
    signature = self.signature(signature_name)
    _check_inputs(signature, inputs)
    unknown = sorted(set(output_filter) - set(signature.outputs))
    if unknown:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"output tensor alias not found in signature: {', '.join(unknown)}; "
        f"signature {signature.name} has outputs {sorted(signature.outputs)}",
      )
    execute = functools.partial(self._execute, signature.name)
    if self._batch_scheduler is not None and signature.batchable:
      outputs = self._batch_scheduler.run(self, signature.name, inputs, execute)
    else:
      outputs = execute(inputs)
    wanted = set(output_filter) or set(outputs)
    return {k: v for k, v in outputs.items() if k in wanted}

  def _execute(self, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tf = self._tf
    function = self._loaded.signatures[signature_name]
    try:
      result = function(**{k: tf.constant(v) for k, v in inputs.items()})
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
      raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e).strip()) from e
    return {k: v.numpy() for k, v in result.items()}

  def warm_up(self) -> int:
    """Replays `assets.extra/tf_serving_warmup_requests` (Predict logs); returns how many ran.

    With batching, the first record of each batchable signature also runs at every batch size
    the scheduler pads to (its rows repeated), so no request waits for a compile."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(self.path, WARMUP_PATH)
    if not os.path.exists(path):
      return 0
    count = 0
    warm = set()  # Signatures run at every batch size.
    for record in self._tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
      log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
      if log.WhichOneof("log_type") != "predict_log":
        raise ValueError(f"warmup record {count} is not a PredictLog; only Predict is supported")
      request = log.predict_log.request
      inputs = {k: self._tf.make_ndarray(v) for k, v in request.inputs.items()}
      self.run(request.model_spec.signature_name, inputs, tuple(request.output_filter))
      signature = self.signature(request.model_spec.signature_name)
      if self._batch_scheduler is not None and signature.batchable and signature.name not in warm:
        warm.add(signature.name)
        for size in self._batch_scheduler.options.batch_sizes:
          self._execute(signature.name, {k: _resize_rows(v, size) for k, v in inputs.items()})
      count += 1
    return count


def _resize_rows(value: np.ndarray, rows: int) -> np.ndarray:
  """`value`'s rows repeated (or cut) to `rows` rows."""
  return np.resize(value, (rows, *value.shape[1:]))


def _specs(tensor_infos) -> dict[str, TensorSpec]:
  return {
    name: TensorSpec(
      info.dtype,
      None if info.tensor_shape.unknown_rank else tuple(d.size for d in info.tensor_shape.dim),
    )
    for name, info in tensor_infos.items()
  }


def _check_inputs(signature: SignatureInfo, inputs: dict[str, np.ndarray]) -> None:
  import tensorflow as tf

  missing = sorted(set(signature.inputs) - set(inputs))
  extra = sorted(set(inputs) - set(signature.inputs))
  if missing or extra:
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      f"signature {signature.name} takes inputs {sorted(signature.inputs)}; "
      + (f"missing {missing}" if missing else "")
      + ("; " if missing and extra else "")
      + (f"unexpected {extra}" if extra else ""),
    )
  for name, value in inputs.items():
    spec = signature.inputs[name]
    dtype = tensors.datatype_enum(value.dtype)
    if dtype != spec.dtype:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input '{name}' has dtype {tf.as_dtype(dtype).name if dtype else value.dtype} but "
        f"signature {signature.name} expects {tf.as_dtype(spec.dtype).name}",
      )
    if spec.shape is not None and (
      value.ndim != len(spec.shape)
      or any(d != -1 and d != n for d, n in zip(spec.shape, value.shape, strict=True))
    ):
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input '{name}' has shape {list(value.shape)} but signature {signature.name} expects "
        f"{spec.describe()} (-1: any size)",
      )


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


class ModelManager:
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
  ):
    self.name = config.name
    self.base_path = os.path.abspath(config.base_path)
    self.poll_wait_seconds = poll_wait_seconds
    self.batch_scheduler = batch_scheduler
    self.load_retry = load_retry
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
    self.version_labels = dict(labels)  # One reference swap: lookups see old or new, never half.

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
      on_disk = {int(d) for d in os.listdir(self.base_path) if d.isdigit()}
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
    path = os.path.join(self.base_path, str(version))
    self._set_status(version, LOADING)
    start = time.perf_counter()
    try:
      loaded = LoadedVersion(self.name, version, path, self.batch_scheduler)
      warmup_count = loaded.warm_up()
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
      "Serving %s version %d (%d warmup requests) after %.1f s",
      self.name,
      version,
      warmup_count,
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


class ServedModels:
  """The models a server serves, by name; the same lookups as a ModelManager, and `reload` to
  change the set of models, their version policies and labels while serving."""

  def __init__(
    self,
    *,
    poll_wait_seconds: float = 1.0,
    batch_scheduler: BatchScheduler | None = None,
    load_retry: LoadRetry = LoadRetry(),
  ):
    self.poll_wait_seconds = poll_wait_seconds
    self.load_retry = load_retry
    self.batch_scheduler = batch_scheduler
    # Replaced whole by `reload`, never mutated: lookups read one consistent dict.
    self.managers: dict[str, ModelManager] = {}
    self._reload_lock = threading.Lock()
    self._polling = False
    self.on_models_changed: list = []  # Callbacks taking the new model names.

  def _get(self, name: str, message: str) -> ModelManager:
    manager = self.managers.get(name)
    if manager is None:
      raise ServingError(grpc.StatusCode.NOT_FOUND, message)
    return manager

  def resolve(self, name: str, version: int | None = None, label: str = "") -> LoadedVersion:
    manager = self._get(name, f"Servable not found for request: {name!r}")
    return manager.resolve(name, version, label)

  def status(self, name: str, version: int | None = None, label: str = "") -> list[VersionStatus]:
    manager = self._get(name, f"Could not find any versions of model {name}")
    return manager.status(name, version, label)

  def reload(self, configs: list[ModelConfig]) -> None:
    """Serves exactly `configs`, as TF Serving's ReloadConfig: new models are loaded (blocking),
    kept models take their new version policy (polled now), models left out are unloaded, and
    then the version labels are applied. Raises ServingError: INVALID_ARGUMENT for a config
    that cannot be served (nothing changes), FAILED_PRECONDITION for a label naming a version
    that is not available (the models change, the labels stay as they were)."""
    with self._reload_lock:
      bases = [os.path.abspath(c.base_path) for c in configs]
      if len(set(bases)) != len(bases) or len({c.name for c in configs}) != len(configs):
        listed = [(c.name, c.base_path) for c in configs]
        raise ServingError(
          grpc.StatusCode.INVALID_ARGUMENT,
          f"models must have distinct names and base paths; got {listed}",
        )
      old = self.managers
      managers = {}
      for config, base in zip(configs, bases, strict=True):
        manager = old.get(config.name)
        if manager is None or manager.base_path != base:
          manager = ModelManager(
            dataclasses.replace(config, version_labels={}),  # Labels come once versions load.
            poll_wait_seconds=self.poll_wait_seconds,
            batch_scheduler=self.batch_scheduler,
            load_retry=self.load_retry,
          )
        else:
          manager.set_version_policy(config.version_policy)
        managers[config.name] = manager
      for manager in managers.values():
        manager.poll()
      self.managers = managers
      for name, manager in old.items():
        if managers.get(name) is not manager:
          manager.unload_all(reason="removed from the model config")
      if self._polling:
        for name, manager in managers.items():
          if old.get(name) is not manager:
            manager.start()
      for callback in self.on_models_changed:
        callback(list(managers))
      dangling = {c.name: managers[c.name].unavailable_labels(c.version_labels) for c in configs}
      dangling = {name: labels for name, labels in dangling.items() if labels}
      if dangling:
        raise ServingError(
          grpc.StatusCode.FAILED_PRECONDITION,
          "version labels may only name available versions; not available: "
          + "; ".join(
            f"model {name}: " + ", ".join(f"{label}={v}" for label, v in sorted(labels.items()))
            for name, labels in sorted(dangling.items())
          )
          + " (labels left unchanged)",
        )
      for config in configs:
        managers[config.name].set_version_labels(config.version_labels)

  def start(self) -> None:
    """Starts polling every model's base path (models added by later reloads poll too)."""
    with self._reload_lock:
      self._polling = True
      for manager in self.managers.values():
        manager.start()

  def stop(self) -> None:
    with self._reload_lock:
      self._polling = False
      for manager in self.managers.values():
        manager.stop()
