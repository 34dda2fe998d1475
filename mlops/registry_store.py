"""The MLflow Model Registry this project uses: where it is, and a client whose failures read as
one-line errors.

The registry shares the tracking store: `MLFLOW_REGISTRY_URI`, else `MLFLOW_TRACKING_URI`, else
the local SQLite file `mlflow.db` in the project root (what `mlflow ui` in the root opens).
"""

from __future__ import annotations

import contextlib
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIAS_PATTERN = re.compile(r"^[a-z0-9_]+$")
# Aliases `promote` refuses to point at a version without a passing gate record.
GATED_ALIASES = ("canary", "production")


class RegistryError(Exception):
  """Bad input or an unusable registry: the CLI prints `error: <message>` and exits 1."""


def tracking_uri() -> str:
  """The tracking store: MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db."""
  try:
    from trainer import tracking  # The tracking helper's resolution, when present.

    return tracking.resolve_tracking_uri()
  except (ImportError, AttributeError):
    pass
  return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(REPO, 'mlflow.db')}"


def registry_uri() -> str:
  return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def client():
  """An MlflowClient on the registry store. Raises RegistryError when the store is unreachable."""
  from mlflow.tracking import MlflowClient

  uri = registry_uri()
  _check_reachable(uri)
  with translate_errors(f"the registry store {uri}"):
    instance = MlflowClient(tracking_uri=tracking_uri(), registry_uri=uri)
    instance.search_registered_models(max_results=1)  # Fails now, not midway through a command.
  return instance


def _check_reachable(uri: str, timeout_s: float = 5.0) -> None:
  """Fails fast where MLflow would retry for minutes: a database server that does not accept
  connections, or a SQLite file in a directory that does not exist."""
  import socket
  import urllib.parse

  parsed = urllib.parse.urlparse(uri)
  scheme = parsed.scheme.split("+")[0]
  if scheme == "sqlite":
    directory = os.path.dirname(uri[len("sqlite:///") :]) or "."
    if not os.path.isdir(directory):
      raise RegistryError(
        f"the registry store {uri} is unreachable: directory {directory} does not exist "
        "(set MLFLOW_TRACKING_URI to a reachable store)"
      )
    return
  ports = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "http": 80, "https": 443}
  if scheme not in ports or not parsed.hostname:
    return
  address = (parsed.hostname, parsed.port or ports[scheme])
  try:
    socket.create_connection(address, timeout=timeout_s).close()
  except OSError as e:
    raise RegistryError(
      f"the registry store {uri} is unreachable: {address[0]}:{address[1]}: "
      f"{e.strerror or e} (set MLFLOW_TRACKING_URI to a reachable store)"
    ) from e


@contextlib.contextmanager
def translate_errors(what: str):
  """Turns MLflow and database failures inside the block into RegistryError naming `what`."""
  from mlflow.exceptions import MlflowException

  try:
    yield
  except MlflowException as e:
    message = str(e.message if hasattr(e, "message") else e).splitlines()[0]
    raise RegistryError(
      f"{what}: {message} (set MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI to a reachable store)"
    ) from e
  except Exception as e:  # SQLAlchemy / psycopg errors surface unwrapped from some calls.
    if type(e).__module__.split(".")[0] in ("sqlalchemy", "psycopg", "sqlite3"):
      first = str(e).splitlines()[0]
      raise RegistryError(
        f"{what} is unreachable: {first} (set MLFLOW_TRACKING_URI to a reachable store)"
      ) from e
    raise


def check_alias(alias: str) -> str:
  if not ALIAS_PATTERN.match(alias or "") or alias == "latest":
    raise RegistryError(
      f"--alias={alias!r} is not an alias: use lowercase letters, digits and '_' "
      "(e.g. staging, canary, production; 'latest' is reserved)"
    )
  return alias


def registered_model(mlflow_client, name: str):
  """The registered model `name`. Raises RegistryError listing the known names."""
  from mlflow.exceptions import MlflowException

  try:
    return mlflow_client.get_registered_model(name)
  except MlflowException as e:
    if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
      raise RegistryError(f"cannot read registered model {name!r}: {e.message}") from e
  known = sorted(m.name for m in mlflow_client.search_registered_models())
  raise RegistryError(
    f"--name={name} is not a registered model (known: {', '.join(known) or 'none'}); "
    "register a run first: python -m mlops.registry register --workdir=RUN --export_base=DIR"
  )


def model_version(mlflow_client, name: str, version: int | str):
  """Version `version` of `name`. Raises RegistryError listing the existing versions."""
  from mlflow.exceptions import MlflowException

  registered_model(mlflow_client, name)
  try:
    return mlflow_client.get_model_version(name, str(version))
  except MlflowException as e:
    if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
      raise RegistryError(f"cannot read {name} version {version}: {e.message}") from e
  versions = sorted(int(v.version) for v in versions_of(mlflow_client, name))
  raise RegistryError(
    f"{name} has no version {version} (versions: {', '.join(map(str, versions)) or 'none'})"
  )


def versions_of(mlflow_client, name: str) -> list:
  """Every (not deleted) version of `name`, oldest first."""
  found = mlflow_client.search_model_versions(f"name = '{name}'")
  return sorted(found, key=lambda v: int(v.version))


def alias_version(mlflow_client, name: str, alias: str) -> int | None:
  """The version `alias` names, or None when it names none."""
  model = registered_model(mlflow_client, name)
  version = model.aliases.get(alias) if isinstance(model.aliases, dict) else None
  return int(version) if version is not None else None


def resolve_reference(mlflow_client, reference: str):
  """`name@alias` or `name/version` (or `name` alone: its newest version) as a ModelVersion."""
  if "@" in reference:
    name, alias = reference.split("@", 1)
    version = alias_version(mlflow_client, name, alias)
    if version is None:
      aliases = sorted(registered_model(mlflow_client, name).aliases)
      raise RegistryError(
        f"{reference}: {name} has no alias {alias!r} (aliases: {', '.join(aliases) or 'none'})"
      )
    return model_version(mlflow_client, name, version)
  name, _, version = reference.partition("/")
  if version:
    if not version.isdigit():
      raise RegistryError(f"{reference!r} is not name@alias or name/version (e.g. digits/3)")
    return model_version(mlflow_client, name, int(version))
  registered_model(mlflow_client, name)
  versions = versions_of(mlflow_client, name)
  if not versions:
    raise RegistryError(f"{name} has no versions; register a run first")
  return versions[-1]
