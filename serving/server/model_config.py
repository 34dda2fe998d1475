"""What the server serves: TF Serving's ModelServerConfig (`--model_config_file`, or a
HandleReloadConfigRequest) as a list of ModelConfig: name, base_path, version policy, labels
and the prediction log (`logging_config`)."""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import TYPE_CHECKING

from absl import logging

if TYPE_CHECKING:
  from serving.server import served_models

# As TF Serving's names: nothing in a name can step outside a base path or into a URL segment.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
  """TF Serving's ServableVersionPolicy: `latest` (the newest `num_versions`), `all`, or
  `specific` (the listed `versions`, those on disk)."""

  kind: str = "latest"
  num_versions: int = 1
  versions: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in ("latest", "all", "specific"):
      raise ValueError(f"version policy {self.kind!r} is not one of latest, all, specific")
    if self.kind == "latest" and self.num_versions < 1:
      raise ValueError(f"latest {{num_versions: {self.num_versions}}} must be at least 1")
    if self.kind == "specific" and not self.versions:
      raise ValueError("a specific version policy needs at least one version")

  def aspired(self, on_disk: set[int]) -> set[int]:
    if self.kind == "all":
      return set(on_disk)
    if self.kind == "specific":
      return on_disk & set(self.versions)
    return set(sorted(on_disk)[-self.num_versions :])


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """TF Serving's LoggingConfig: log a `sampling_rate` share (0..1) of the model's Predict
  requests to TFRecord files named `filename_prefix` + a suffix (serving/server/
  prediction_logger.py). `log_collector_config.type` is not used: files are the one collector."""

  filename_prefix: str
  sampling_rate: float

  def __post_init__(self):
    if not 0.0 <= self.sampling_rate <= 1.0:
      raise ValueError(
        f"logging_config sampling_rate {self.sampling_rate} must lie in [0, 1] (1: every request)"
      )
    if not self.filename_prefix:
      raise ValueError(
        "logging_config needs log_collector_config { filename_prefix: '/logs/NAME/predict' }"
      )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str
  base_path: str
  version_policy: VersionPolicy = VersionPolicy()
  # label -> version, for model_spec.version_label.
  version_labels: dict[str, int] = dataclasses.field(default_factory=dict)
  logging: LoggingConfig | None = None

  def __post_init__(self):
    if not _MODEL_NAME.match(self.name):
      raise ValueError(
        f"{self.name!r} is not a valid model name: use letters, digits, '_', '.', '-' "
        "(at most 128, not starting with '.' or '-')"
      )
    if not self.base_path:
      raise ValueError(f"model {self.name!r}: base_path is required")


def parse_labels(pairs: list[str]) -> dict[str, int]:
  """`--version_labels` entries (label=version) as a dict. Raises ValueError."""
  labels = {}
  for pair in pairs:
    label, _, version = pair.partition("=")
    if not label or not version.isdigit():
      raise ValueError(f"--version_labels entry {pair!r} is not label=version (e.g. stable=1)")
    labels[label] = int(version)
  return labels


def read(path: str) -> list[ModelConfig]:
  """The models of a text-format ModelServerConfig file. Raises ValueError naming the file and
  what is wrong."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"cannot read --model_config_file={path}: {e.strerror}") from e
  return parse(text, f"--model_config_file={path}")


def parse(text: str, where: str) -> list[ModelConfig]:
  """The models of a text-format ModelServerConfig. Raises ValueError prefixed with `where`."""
  from google.protobuf import text_format
  from tensorflow_serving.config import model_server_config_pb2

  try:
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
  except text_format.ParseError as e:
    raise ValueError(f"{where} is not a text ModelServerConfig: {e}") from e
  return from_proto(config, where)


def from_proto(config, where: str = "the config") -> list[ModelConfig]:
  """The models of a ModelServerConfig message. Raises ValueError prefixed with `where`."""
  if config.WhichOneof("config") != "model_config_list" or not config.model_config_list.config:
    raise ValueError(f"{where} has no model_config_list {{ config {{ ... }} }}")
  models = []
  for model in config.model_config_list.config:
    model_where = f"{where}, model {model.name!r}"
    if model.model_platform not in ("", "tensorflow"):
      raise ValueError(
        f"{model_where}: model_platform {model.model_platform!r} is not 'tensorflow'"
      )
    try:
      models.append(
        ModelConfig(
          model.name,
          model.base_path,
          version_policy=_policy(model.model_version_policy),
          version_labels=dict(model.version_labels),
          logging=_logging(model),
        )
      )
    except ValueError as e:
      raise ValueError(f"{model_where}: {e}") from e
  names = [m.name for m in models]
  if len(set(names)) != len(names):
    raise ValueError(f"{where}: model names repeat: {sorted(names)}")
  return models


def _policy(proto) -> VersionPolicy:
  kind = proto.WhichOneof("policy_choice") or "latest"
  if kind == "latest":
    return VersionPolicy("latest", num_versions=proto.latest.num_versions or 1)
  if kind == "specific":
    return VersionPolicy("specific", versions=tuple(proto.specific.versions))
  return VersionPolicy("all")


def _logging(model) -> LoggingConfig | None:
  if not model.HasField("logging_config"):
    return None
  proto = model.logging_config
  return LoggingConfig(
    proto.log_collector_config.filename_prefix, proto.sampling_config.sampling_rate
  )


def watch(
  models: served_models.ServedModels, path: str, every_seconds: float, stop: threading.Event
) -> None:
  """Applies `path` whenever its text changes; retries a text that failed to apply (a label
  may name a version still being exported), logging each distinct error once, until `stop`."""
  from serving.server.errors import ServingError  # Imports grpc: only where a server runs.

  applied, error = None, None
  while not stop.wait(every_seconds):
    try:
      with open(path) as f:
        text = f.read()
      if text == applied and error is None:
        continue
      applied = text
      models.reload(parse(text, f"--model_config_file={path}"))
      if error is not None:
        logging.info("Applied --model_config_file=%s", path)
      error = None
    except (OSError, ValueError, ServingError) as e:
      message = e.message if isinstance(e, ServingError) else str(e)
      if message != error:
        logging.error("Not applying --model_config_file=%s: %s", path, message)
      error = message
