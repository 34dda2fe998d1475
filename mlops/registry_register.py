"""`register`: a training run becomes registry version N, which is the directory
`<export_base>/N` TF Serving reads.

The slow export runs outside any lock into a hidden staging directory; then, holding the export
base's lock, the version is created in MLflow (source: the final directory) and the staged
directory renamed into place. The store numbers versions itself (max + 1, deleted ones counted),
so the number is checked, never adapted: a directory N that already exists, or a store that
numbers differently, is an error. A version whose process died between the two steps is left
`registry.state=registering` without a directory; the next register deletes it (its number
stays burned, as MLflow keeps deleted versions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

from absl import logging

from mlops import registry_audit, registry_faults
from mlops.registry_store import RegistryError, registry_uri, translate_errors, versions_of

MANIFEST = os.path.join("assets.extra", "manifest.json")
STATE_TAG = "registry.state"


@dataclasses.dataclass(frozen=True)
class Registered:
  name: str
  version: int
  path: str
  exported: bool  # False when an existing export of the same step was registered.


def register(mlflow_client, workdir: str, export_base: str, name: str, step: str) -> Registered:
  """Exports step `step` of `workdir` (unless `<export_base>` already holds that export) and
  registers it as the next version of `name`. Raises RegistryError (or the exporter's
  ConfigError / ParityError); nothing is left registered or exported on failure."""
  from serving.export import exporter, loading

  export_base = os.path.abspath(export_base)
  step_number = loading.resolve_step(workdir, step).step
  _ensure_registered_model(mlflow_client, name, export_base)
  existing = _existing_export(export_base, workdir, step_number)
  _check_next_directory(mlflow_client, name, export_base, existing)  # Before the slow export.
  staging = None
  if existing is None:
    staging = os.path.join(export_base, f".staging-{registry_audit.new_txn()}")
    try:
      exporter.export(workdir, staging, step=str(step_number), version=1)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  try:
    with registry_audit.locked(export_base):
      _delete_stale(mlflow_client, name, export_base)
      version = _reserve(mlflow_client, name, export_base, workdir, existing, staging)
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)
  return Registered(name, version, os.path.join(export_base, str(version)), existing is None)


def _ensure_registered_model(mlflow_client, name: str, export_base: str):
  from mlflow.exceptions import MlflowException

  with translate_errors(f"registered model {name!r}"):
    try:
      model = mlflow_client.get_registered_model(name)
    except MlflowException as e:
      if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
        raise
      try:
        return mlflow_client.create_registered_model(name, tags={"export_base": export_base})
      except MlflowException as again:  # Another process created it first.
        if getattr(again, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
          raise
        model = mlflow_client.get_registered_model(name)
  if model.tags.get("export_base", export_base) != export_base:
    raise RegistryError(
      f"{name} versions live in {model.tags['export_base']}, not --export_base={export_base}; "
      f"pass that base or another --name"
    )
  return model


def _existing_export(export_base: str, workdir: str, step: int) -> int | None:
  """The version directory that already exports `step` of `workdir` without a registry
  version (from `python -m serving.export`), if any."""
  if not os.path.isdir(export_base):
    return None
  for entry in sorted((e for e in os.listdir(export_base) if e.isdigit()), key=int):
    manifest = read_manifest(os.path.join(export_base, entry))
    if os.path.exists(os.path.join(export_base, entry, "MLmodel")):
      continue  # Registered already.
    if (
      manifest.get("workdir") == os.path.abspath(workdir)
      and manifest.get("checkpoint_step") == step
    ):
      return int(entry)
  return None


def _next_version(mlflow_client, name: str) -> int:
  return max((int(v.version) for v in versions_of(mlflow_client, name)), default=0) + 1


def _check_next_directory(mlflow_client, name, export_base, existing) -> int:
  """The next version number. Raises RegistryError when its directory is taken (or an
  existing export of this step sits at another number)."""
  expected = _next_version(mlflow_client, name)
  if existing is not None and existing != expected:
    raise RegistryError(
      f"{export_base}/{existing} already exports this step, but the next version of {name} is "
      f"{expected}; versions are never renumbered: register into an empty --export_base"
    )
  final = os.path.join(export_base, str(expected))
  if existing is None and os.path.exists(final):
    raise RegistryError(
      f"{final} exists but is not version {expected} of {name} in the registry "
      f"({registry_uri()}); versions are never renumbered: move that directory away or "
      "register into another --export_base"
    )
  return expected


def _delete_stale(mlflow_client, name: str, export_base: str) -> None:
  """Deletes versions left `registering` by a process that died (the caller holds the lock,
  so no live process is registering)."""
  for version in versions_of(mlflow_client, name):
    if version.tags.get(STATE_TAG) == "registering":
      logging.warning(
        "Deleting %s version %s: its registration never finished", name, version.version
      )
      mlflow_client.delete_model_version(name, version.version)


def _reserve(mlflow_client, name, export_base, workdir, existing, staging) -> int:
  """Creates the version whose number is the directory's; moves the staged export there."""
  from mlops import model_card, registry_pyfunc

  source_dir = os.path.join(staging, "1") if staging else os.path.join(export_base, str(existing))
  manifest = read_manifest(source_dir)
  expected = _check_next_directory(mlflow_client, name, export_base, existing)
  for _ in range(3):  # Deleted versions still count in the store's numbering: skip past them.
    final = os.path.join(export_base, str(expected))
    if os.path.exists(final) and existing != expected:
      raise RegistryError(
        f"{final} exists but is not version {expected} of {name}; versions are never "
        "renumbered: move that directory away or register into another --export_base"
      )
    tags = {**version_tags(workdir, manifest, source_dir), STATE_TAG: "registering"}
    with translate_errors(f"registering {name}"):
      created = mlflow_client.create_model_version(
        name, source=final, run_id=tags.get("mlflow.run_id") or None, tags=tags
      )
    if int(created.version) == expected:
      break
    mlflow_client.delete_model_version(name, created.version)
    expected = int(created.version) + 1
  else:
    raise RegistryError(f"the registry kept numbering {name} past {expected}; nothing registered")
  registry_faults.point("register_after_create")
  try:
    registry_pyfunc.save_flavor(source_dir)
    model_card.write(mlflow_client, name, expected, source_dir, manifest=manifest)
    if staging:
      os.rename(source_dir, final)
  except BaseException:
    mlflow_client.delete_model_version(name, str(expected))
    for file in (*registry_pyfunc.FLAVOR_FILES, "registry_pyfunc.py"):
      if existing is not None and os.path.exists(os.path.join(source_dir, file)):
        os.remove(os.path.join(source_dir, file))
    raise
  mlflow_client.set_model_version_tag(name, str(expected), STATE_TAG, "ready")
  return expected


def read_manifest(version_dir: str) -> dict:
  try:
    with open(os.path.join(version_dir, MANIFEST)) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


def run_info(workdir: str) -> dict:
  """`<workdir>/mlflow_run.json` (tracking_uri, experiment_id, run_id; {} when untracked)."""
  try:
    with open(os.path.join(workdir, "mlflow_run.json")) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


def version_tags(workdir: str, manifest: dict, version_dir: str) -> dict[str, str]:
  """The tags a version carries: where it came from and what its export is."""
  run = run_info(workdir)
  git = manifest.get("git") or {}
  export = manifest.get("export") or {}
  with open(os.path.join(version_dir, MANIFEST), "rb") as f:
    manifest_hash = "sha256:" + hashlib.sha256(f.read()).hexdigest()
  tags = {
    "mlflow.run_id": run.get("run_id", ""),
    "workdir": os.path.abspath(workdir),
    "git.commit": str(git.get("commit")),
    "git.dirty": str(git.get("dirty")),
    "data.fingerprint": str(manifest.get("data_fingerprint")),
    "checkpoint.step": str(manifest.get("checkpoint_step")),
    "export.parity": json.dumps(manifest.get("parity_max_relative_error", {}), sort_keys=True),
    "export.calling_convention": str(export.get("calling_convention_version")),
    "export.manifest_sha256": manifest_hash,
  }
  for key in ("hpo_study", "hpo_trial"):
    if run.get(key) is not None:
      tags[key.replace("_", ".")] = str(run[key])
  return {k: v for k, v in tags.items() if v != ""}
