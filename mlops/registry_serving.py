"""The TF Serving side of an alias: the label in a `model_config_file` and on a live server.

The file is the text ModelServerConfig both servers (`tensorflow_model_server` and this
project's) read; it is parsed and checked with the server's own reader
(serving/server/model_config.py) and rewritten atomically (temp file + rename), so a server
polling it sees the old text or the new, never half.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

from mlops.registry_store import RegistryError


def read_text(path: str) -> str | None:
  """The file's text, or None when it does not exist."""
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise RegistryError(f"cannot read --model_config_file={path}: {e.strerror}") from e


def parse(text: str | None, path: str):
  """The ModelServerConfig proto of `text` (an empty one for None), checked by the server's
  reader. Raises RegistryError naming the file."""
  from google.protobuf import text_format

  from serving.api_protos import model_server_config_pb2
  from serving.server import model_config

  config = model_server_config_pb2.ModelServerConfig()
  if text is None or not text.strip():
    return config
  try:
    text_format.Parse(text, config)
    model_config.from_proto(config, f"--model_config_file={path}")
  except (text_format.ParseError, ValueError) as e:
    raise RegistryError(f"--model_config_file={path} is not a usable ModelServerConfig: {e}") from e
  return config


def labels(text: str | None, path: str, name: str) -> dict[str, int]:
  """The version labels the file gives model `name` ({} when it does not name it)."""
  for model in parse(text, path).model_config_list.config:
    if model.name == name:
      return dict(model.version_labels)
  return {}


def with_label(text: str | None, path: str, name: str, base_path: str, alias: str, version):
  """The file's text with `name`'s label `alias` at `version` (None: the label removed).

  The model's entry is added when missing (base path `base_path`). Its version policy becomes
  `specific` over the labelled versions and the version the label leaves (kept loaded, so a
  rollback needs no load), since a label may only name a loaded version and TF Serving's default
  policy loads just the newest; an `all` policy is kept.
  """
  from google.protobuf import text_format

  config = parse(text, path)
  models = config.model_config_list.config
  entry = next((m for m in models if m.name == name), None)
  if entry is None:
    entry = models.add(name=name, base_path=os.path.abspath(base_path), model_platform="tensorflow")
  displaced = entry.version_labels.get(alias)
  if version is None:
    entry.version_labels.pop(alias, None)
  else:
    entry.version_labels[alias] = int(version)
  keep = set(entry.version_labels.values()) | ({displaced} if displaced is not None else set())
  _set_specific(entry, keep)
  return text_format.MessageToString(config)


def _set_specific(entry, versions: set[int]) -> None:
  if entry.model_version_policy.WhichOneof("policy_choice") == "all":
    return
  if versions:
    entry.model_version_policy.specific.Clear()
    entry.model_version_policy.specific.versions.extend(sorted(versions))
  else:
    entry.model_version_policy.ClearField("specific")


def write_atomically(path: str, text: str | None) -> None:
  """Replaces the file by `text` (None: removes it) through a temp file and a rename."""
  if text is None:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".model_config-", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def reload_server(
  server: str,
  text: str,
  old_text: str | None,
  path: str,
  name: str,
  labels_wanted: dict[str, int],
  timeout_s: float = 120.0,
) -> None:
  """Makes the server at `server` serve `text` in TF Serving's two steps, without a moment in
  which a label is missing: first the new versions load beside the old labels' versions (the
  labels of `old_text` kept), waiting until each is AVAILABLE; then the new labels, waiting
  until each resolves to its version. Raises RegistryError when the server is unreachable,
  refuses the config, or a version does not load within `timeout_s`."""
  import grpc

  config = parse(text, path)
  entry = next(m for m in config.model_config_list.config if m.name == name)
  old_labels = labels(old_text, path, name)
  stub, channel = _model_stub(server)
  try:
    staged = type(config)()
    staged.CopyFrom(config)
    staged_entry = next(m for m in staged.model_config_list.config if m.name == name)
    staged_entry.version_labels.clear()
    staged_entry.version_labels.update(old_labels)
    specific = set(staged_entry.model_version_policy.specific.versions)
    _set_specific(staged_entry, specific | set(old_labels.values()) | set(labels_wanted.values()))
    _reload(stub, staged, server)
    deadline = time.monotonic() + timeout_s
    for version in sorted(set(entry.version_labels.values())):
      _wait(
        lambda v=version: _state(stub, name, v, "") == (v, "AVAILABLE"),
        deadline,
        f"version {version} of {name} did not become AVAILABLE on {server}",
      )
    _reload(stub, config, server)
    for label, version in sorted(labels_wanted.items()):
      _wait(
        lambda la=label, v=version: _state(stub, name, None, la) == (v, "AVAILABLE"),
        deadline,
        f"label {label} of {name} did not resolve to {version} on {server}",
      )
  except grpc.RpcError as e:
    raise RegistryError(f"model server --server={server}: {e.code().name}: {e.details()}") from e
  finally:
    channel.close()


def served_version(server: str, name: str, label: str, timeout_s: float = 5.0) -> int | None:
  """The version `label` resolves to on the server (None when it names none)."""
  import grpc

  stub, channel = _model_stub(server)
  try:
    return _state(stub, name, None, label, timeout_s)[0]
  except grpc.RpcError:
    return None
  finally:
    channel.close()


def version_state(server: str, name: str, version: int) -> str:
  """The state (AVAILABLE, LOADING, ...) of `version` on the server; "" when it has none.
  Raises RegistryError when the server cannot be reached."""
  import grpc

  stub, channel = _model_stub(server, timeout_s=2)
  try:
    return _state(stub, name, version, "")[1]
  except grpc.RpcError:
    return ""
  finally:
    channel.close()


def _model_stub(server: str, timeout_s: float = 10):
  import grpc

  from serving.api_protos import model_service_pb2_grpc

  channel = grpc.insecure_channel(server)
  try:
    grpc.channel_ready_future(channel).result(timeout=timeout_s)
  except grpc.FutureTimeoutError:
    channel.close()
    raise RegistryError(
      f"cannot reach a model server at --server={server} (is it running? check host:port)"
    ) from None
  return model_service_pb2_grpc.ModelServiceStub(channel), channel


def _reload(stub, config, server: str) -> None:
  from serving.api_protos import model_management_pb2

  request = model_management_pb2.ReloadConfigRequest(config=config)
  response = stub.HandleReloadConfigRequest(request, timeout=120)
  if response.status.error_code:
    raise RegistryError(
      f"model server --server={server} refused the config: {response.status.error_message}"
    )


def _state(stub, name: str, version: int | None, label: str, timeout_s: float = 10.0):
  """(version, state) of the version the spec names (the newest when several)."""
  import grpc

  from serving.api_protos import get_model_status_pb2

  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = name
  if version is not None:
    request.model_spec.version.value = version
  if label:
    request.model_spec.version_label = label
  try:
    response = stub.GetModelStatus(request, timeout=timeout_s)
  except grpc.RpcError as e:
    if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
      return None, ""
    raise
  states = get_model_status_pb2.ModelVersionStatus.State
  entries = sorted(response.model_version_status, key=lambda s: s.version)
  if not entries:
    return None, ""
  return entries[-1].version, states.Name(entries[-1].state)


def _wait(condition, deadline: float, message: str) -> None:
  while not condition():
    if time.monotonic() > deadline:
      raise RegistryError(message)
    time.sleep(0.1)
