"""Reads TF Serving's --model_config_file: a text-format ModelServerConfig with a
`model_config_list` of models (name, base_path, model_platform, model_version_policy,
version_labels)."""

from __future__ import annotations

from serving.model_manager import ModelManager, VersionPolicy


def read(path: str, *, poll_wait_seconds: float) -> list[ModelManager]:
  """One ModelManager per configured model. Raises ValueError naming the file and what is wrong."""
  from google.protobuf import text_format
  from tensorflow_serving.config import model_server_config_pb2

  try:
    with open(path) as f:
      config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
  except OSError as e:
    raise ValueError(f"cannot read --model_config_file={path}: {e.strerror}") from e
  except text_format.ParseError as e:
    raise ValueError(f"--model_config_file={path} is not a text ModelServerConfig: {e}") from e
  if config.WhichOneof("config") != "model_config_list" or not config.model_config_list.config:
    raise ValueError(f"--model_config_file={path} has no model_config_list {{ config {{ ... }} }}")
  managers = []
  for model in config.model_config_list.config:
    where = f"--model_config_file={path}, model {model.name!r}"
    if model.model_platform not in ("", "tensorflow"):
      raise ValueError(f"{where}: model_platform {model.model_platform!r} is not 'tensorflow'")
    if not model.base_path:
      raise ValueError(f"{where}: base_path is required")
    try:
      managers.append(
        ModelManager(
          model.name,
          model.base_path,
          poll_wait_seconds=poll_wait_seconds,
          version_labels=dict(model.version_labels),
          version_policy=_policy(model.model_version_policy),
        )
      )
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
  return managers


def _policy(proto) -> VersionPolicy:
  kind = proto.WhichOneof("policy_choice") or "latest"
  if kind == "latest":
    return VersionPolicy("latest", num_versions=proto.latest.num_versions or 1)
  if kind == "specific":
    return VersionPolicy("specific", versions=tuple(proto.specific.versions))
  return VersionPolicy("all")
