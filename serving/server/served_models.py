"""The set of models a server serves, by name, and `reload` to change it while serving."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable

import grpc
from absl import logging

from serving.server.batching import BatchScheduler
from serving.server.errors import ServingError
from serving.server.loaded_version import LoadedVersion
from serving.server.model_config import ModelConfig
from serving.server.model_versions import LoadRetry, ModelVersions, VersionStatus, Warmup


class ServedModels:
  """The models a server serves: the same lookups as ModelVersions, by model name, and
  `reload` to change the set of models, their version policies and labels while serving.
  Lookups are thread-safe and never block on a reload."""

  def __init__(
    self,
    *,
    poll_wait_seconds: float = 1.0,
    batch_scheduler: BatchScheduler | None = None,
    load_retry: LoadRetry | None = None,
    warmup: Warmup | None = None,
  ):
    self.poll_wait_seconds = poll_wait_seconds
    self.load_retry = load_retry or LoadRetry()
    self.warmup = warmup or Warmup()
    self.batch_scheduler = batch_scheduler
    # Replaced whole by `reload`, never mutated: lookups read one consistent dict.
    self.models: dict[str, ModelVersions] = {}
    # The configs served, by name (logging config included); replaced whole by `reload`.
    self.configs: dict[str, ModelConfig] = {}
    self._reload_lock = threading.Lock()
    self._polling = False
    # Called with the new model names after every reload.
    self.on_models_changed: list[Callable[[list[str]], None]] = []

  def _get(self, name: str, message: str) -> ModelVersions:
    model = self.models.get(name)
    if model is None:
      raise ServingError(grpc.StatusCode.NOT_FOUND, message)
    return model

  def resolve(self, name: str, version: int | None = None, label: str = "") -> LoadedVersion:
    """The served version for a model spec. Raises ServingError (NOT_FOUND, INVALID_ARGUMENT)."""
    model = self._get(name, f"Servable not found for request: {name!r}")
    return model.resolve(name, version, label)

  def status(self, name: str, version: int | None = None, label: str = "") -> list[VersionStatus]:
    """Status of a model's versions (or one). Raises ServingError like `resolve`."""
    model = self._get(name, f"Could not find any versions of model {name}")
    return model.status(name, version, label)

  def reload(self, configs: list[ModelConfig]) -> None:
    """Serves exactly `configs`, as TF Serving's ReloadConfig: new models are loaded (blocking),
    kept models take their new version policy (polled now), models left out are unloaded, and
    then the version labels are applied. Raises ServingError: INVALID_ARGUMENT for a config
    that cannot be served (nothing changes), FAILED_PRECONDITION for a label naming a version
    that is not available (the models change, the labels stay as they were)."""
    with self._reload_lock:
      _check_distinct(configs)
      old = self.models
      models = {config.name: self._model_for(config, old.get(config.name)) for config in configs}
      for model in models.values():
        model.poll()
      self.models = models
      self.configs = {config.name: config for config in configs}
      for name, model in old.items():
        if models.get(name) is not model:
          model.unload_all(reason="removed from the model config")
          logging.info("Model %s left the config (was served from %s)", name, model.base_path)
      for name, model in models.items():
        if old.get(name) is not model:
          logging.info("Model %s joined the config, served from %s", name, model.base_path)
          if self._polling:
            model.start()
      for callback in self.on_models_changed:
        callback(list(models))
      _check_labels_available(configs, models)
      for config in configs:
        models[config.name].set_version_labels(config.version_labels)

  def _model_for(self, config: ModelConfig, current: ModelVersions | None) -> ModelVersions:
    if current is not None and current.base_path == os.path.abspath(config.base_path):
      current.set_version_policy(config.version_policy)
      return current
    return ModelVersions(
      dataclasses.replace(config, version_labels={}),  # Labels come once versions load.
      poll_wait_seconds=self.poll_wait_seconds,
      batch_scheduler=self.batch_scheduler,
      load_retry=self.load_retry,
      warmup=self.warmup,
    )

  def start(self) -> None:
    """Starts polling every model's base path (models added by later reloads poll too)."""
    with self._reload_lock:
      self._polling = True
      for model in self.models.values():
        model.start()

  def stop(self) -> None:
    with self._reload_lock:
      self._polling = False
      for model in self.models.values():
        model.stop()


def _check_distinct(configs: list[ModelConfig]) -> None:
  bases = [os.path.abspath(c.base_path) for c in configs]
  if len(set(bases)) != len(bases) or len({c.name for c in configs}) != len(configs):
    listed = [(c.name, c.base_path) for c in configs]
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      f"models must have distinct names and base paths; got {listed}",
    )


def _check_labels_available(configs: list[ModelConfig], models: dict[str, ModelVersions]) -> None:
  dangling = {c.name: models[c.name].unavailable_labels(c.version_labels) for c in configs}
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
