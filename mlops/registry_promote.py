"""`promote` and `rollback`: one audited move of an alias, in MLflow and in TF Serving.

A move is a transaction over three places that cannot share one atomic write (the MLflow store,
the model config file, the live server), so it runs as a write-ahead log in the audit file
(registry_audit.py): `begin` records the old and new state, then the alias moves, the file is
replaced, the server reloads and answers the label with the new version, and `commit` ends it.
A failing step restores the old state and writes `abort`; a killed process leaves a `begin`
alone, and the next registry command on that export base (`recover`) restores the old state
before doing anything else. Alias and config file therefore never disagree once a command has
run.
"""

from __future__ import annotations

import os

from absl import logging

from mlops import registry_audit, registry_faults, registry_serving
from mlops.registry_register import STATE_TAG
from mlops.registry_store import (
  GATED_ALIASES,
  RegistryError,
  alias_version,
  check_alias,
  model_version,
  registered_model,
  translate_errors,
)


def export_base_of(mlflow_client, name: str) -> str:
  base = registered_model(mlflow_client, name).tags.get("export_base")
  if not base:
    raise RegistryError(f"{name} was not registered by mlops.registry (no export_base tag)")
  return base


def check_servable(mlflow_client, name: str, version: int) -> str:
  """The version's directory. Raises RegistryError when it is unfinished or gone."""
  found = model_version(mlflow_client, name, version)
  if found.tags.get(STATE_TAG) != "ready":
    raise RegistryError(f"{name} version {version} never finished registering; register again")
  if not os.path.isfile(os.path.join(found.source, "saved_model.pb")):
    raise RegistryError(
      f"{name} version {version}: its directory {found.source} is gone; restore it from backup "
      "or promote another version"
    )
  return found.source


def gate_verdict(mlflow_client, name: str, version: int) -> dict:
  """{"verdict": pass|fail|none, "failed": [...], "record": path} from the version's tags."""
  tags = model_version(mlflow_client, name, version).tags
  failed = [c for c in tags.get("gate.failed", "").split(",") if c]
  return {
    "verdict": tags.get("gate.verdict", "none"),
    "failed": failed,
    "record": tags.get("gate.record", ""),
  }


def promote(
  mlflow_client,
  name: str,
  version: int,
  alias: str,
  *,
  model_config_file: str | None = None,
  server: str | None = None,
  reason: str = "",
  force: bool = False,
  kind: str = "promote",
) -> dict:
  """Points `name@alias` (and the file's / server's label `alias`) at `version`. Returns the
  begin record. Raises RegistryError, after restoring the old state, when any step fails; or
  before touching anything when the version is unservable or has no passing gate record."""
  check_alias(alias)
  check_servable(mlflow_client, name, version)
  gate = gate_verdict(mlflow_client, name, version)
  if kind == "promote" and alias in GATED_ALIASES and gate["verdict"] != "pass" and not force:
    why = (
      f"its gate failed: {', '.join(gate['failed'])}"
      if gate["verdict"] == "fail"
      else "it has no gate record"
    )
    raise RegistryError(
      f"refusing to point {name}@{alias} at version {version}: {why}; run python -m "
      f"mlops.validate --name={name} --candidate={version} (or pass --force, audited as forced)"
    )
  export_base = export_base_of(mlflow_client, name)
  config_path = os.path.abspath(model_config_file) if model_config_file else None
  with registry_audit.locked(export_base):
    recover(mlflow_client, export_base)
    old_text = registry_serving.read_text(config_path) if config_path else None
    new_text = None
    if config_path:
      new_text = registry_serving.with_label(
        old_text, config_path, name, export_base, alias, version
      )
    begin = registry_audit.append(
      export_base,
      {
        "event": "begin",
        "txn": registry_audit.new_txn(),
        "kind": kind,
        "name": name,
        "alias": alias,
        "from": alias_version(mlflow_client, name, alias),
        "to": int(version),
        "gate": gate,
        "forced": bool(force and gate["verdict"] != "pass"),
        "reason": reason,
        "model_config_file": config_path,
        "old_config": old_text,
        "new_config": new_text,
        "server": server,
      },
    )
    try:
      _apply(mlflow_client, begin)
    except BaseException as e:
      _restore(mlflow_client, begin)
      registry_audit.append(export_base, {"event": "abort", "txn": begin["txn"], "error": str(e)})
      if isinstance(e, RegistryError):
        raise RegistryError(f"{e} (nothing changed: {name}@{alias} stays {begin['from']})") from e
      raise
    registry_audit.append(export_base, {"event": "commit", "txn": begin["txn"]})
  _refresh_cards(mlflow_client, name, [begin["from"], begin["to"]])
  return begin


def _refresh_cards(mlflow_client, name: str, versions: list) -> None:
  """Rewrites the model cards of the versions whose aliases changed (a card that cannot be
  written is logged: the move itself is done)."""
  from mlops import model_card

  for version in versions:
    if version is None:
      continue
    try:
      source = mlflow_client.get_model_version(name, str(version)).source
      model_card.write(mlflow_client, name, version, source)
    except Exception as e:  # Best effort by design; the audit log and the alias are what count.
      logging.warning("Could not refresh the model card of %s version %s: %s", name, version, e)


def _apply(mlflow_client, begin: dict) -> None:
  registry_faults.point("after_begin")
  with translate_errors(f"moving {begin['name']}@{begin['alias']}"):
    mlflow_client.set_registered_model_alias(begin["name"], begin["alias"], str(begin["to"]))
  registry_faults.point("after_alias")
  if begin["model_config_file"]:
    registry_serving.write_atomically(begin["model_config_file"], begin["new_config"])
  registry_faults.point("after_config")
  if begin["server"]:
    if not begin["new_config"]:
      raise RegistryError("--server needs --model_config_file (the config the server reloads)")
    registry_serving.reload_server(
      begin["server"],
      begin["new_config"],
      begin["old_config"],
      begin["model_config_file"],
      begin["name"],
      {begin["alias"]: begin["to"]},
    )
  registry_faults.point("after_server")


def _restore(mlflow_client, begin: dict) -> None:
  """Puts the alias, the file and (best effort) the server back as `begin` found them."""
  name, alias = begin["name"], begin["alias"]
  with translate_errors(f"restoring {name}@{alias}"):
    if begin["from"] is None:
      mlflow_client.delete_registered_model_alias(name, alias)
    else:
      mlflow_client.set_registered_model_alias(name, alias, str(begin["from"]))
  if begin["model_config_file"]:
    registry_serving.write_atomically(begin["model_config_file"], begin["old_config"])
  if begin["server"] and begin["old_config"]:
    try:
      labels = registry_serving.labels(begin["old_config"], begin["model_config_file"], name)
      registry_serving.reload_server(
        begin["server"],
        begin["old_config"],
        begin["new_config"],
        begin["model_config_file"],
        name,
        labels,
        timeout_s=60,
      )
    except RegistryError as e:
      logging.warning("Could not restore the config on %s: %s", begin["server"], e)


def recover(mlflow_client, export_base: str) -> list[dict]:
  """Restores the old state of every transaction a dead process left open (the caller holds
  the export base's lock). Returns their begin records."""
  open_txns = registry_audit.open_transactions(registry_audit.read(export_base))
  for begin in open_txns:
    logging.warning(
      "Recovering an interrupted move of %s@%s (%s -> %s): restoring %s",
      begin["name"],
      begin["alias"],
      begin["from"],
      begin["to"],
      begin["from"],
    )
    _restore(mlflow_client, begin)
    registry_audit.append(export_base, {"event": "recover", "txn": begin["txn"]})
  return open_txns


def rollback(
  mlflow_client,
  name: str,
  alias: str,
  *,
  model_config_file: str | None = None,
  server: str | None = None,
  reason: str = "",
) -> dict:
  """Moves `name@alias` back to the version it named before its current one (from the audit
  log), in the model config file the last move used unless another is given."""
  check_alias(alias)
  export_base = export_base_of(mlflow_client, name)
  with registry_audit.locked(export_base):
    recover(mlflow_client, export_base)
  records = registry_audit.read(export_base)
  history = registry_audit.alias_history(records, name, alias)
  if len(history) < 2:
    raise RegistryError(
      f"{name}@{alias} has no earlier version in the audit log "
      f"({registry_audit.audit_path(export_base)}); promote a version instead"
    )
  last = registry_audit.committed_moves(records, name, alias)[-1]
  return promote(
    mlflow_client,
    name,
    history[-2],
    alias,
    model_config_file=model_config_file or last["model_config_file"],
    server=server,
    reason=reason or f"rollback from {history[-1]}",
    kind="rollback",
  )


def remove_alias(
  mlflow_client,
  name: str,
  alias: str,
  *,
  model_config_file: str | None = None,
  server: str | None = None,
  reason: str = "",
) -> dict | None:
  """Removes `name@alias` and the file's / server's label `alias` in one audited transaction
  (kind `remove`, `to` None; recovered like a move when interrupted). Returns the begin record,
  or None when the alias names no version and the file has no such label (nothing to do)."""
  check_alias(alias)
  export_base = export_base_of(mlflow_client, name)
  config_path = os.path.abspath(model_config_file) if model_config_file else None
  with registry_audit.locked(export_base):
    recover(mlflow_client, export_base)
    old_text = registry_serving.read_text(config_path) if config_path else None
    current = alias_version(mlflow_client, name, alias)
    labelled = config_path and alias in registry_serving.labels(old_text, config_path, name)
    if current is None and not labelled:
      return None
    new_text = None
    if config_path:
      new_text = registry_serving.with_label(old_text, config_path, name, export_base, alias, None)
    begin = registry_audit.append(
      export_base,
      {
        "event": "begin",
        "txn": registry_audit.new_txn(),
        "kind": "remove",
        "name": name,
        "alias": alias,
        "from": current,
        "to": None,
        "gate": None,
        "forced": False,
        "reason": reason,
        "model_config_file": config_path,
        "old_config": old_text,
        "new_config": new_text,
        "server": server,
      },
    )
    try:
      with translate_errors(f"removing {name}@{alias}"):
        if current is not None:
          mlflow_client.delete_registered_model_alias(name, alias)
      if config_path:
        registry_serving.write_atomically(config_path, new_text)
      if server and new_text:
        registry_serving.reload_server(server, new_text, old_text, config_path, name, {})
    except BaseException as e:
      _restore(mlflow_client, begin)
      registry_audit.append(export_base, {"event": "abort", "txn": begin["txn"], "error": str(e)})
      raise
    registry_audit.append(export_base, {"event": "commit", "txn": begin["txn"]})
  return begin
