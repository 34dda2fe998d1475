"""Lineage: the chain from the data to the label a server answers with, for one version.

  data (source, fingerprint) -> git commit -> config (and its difference from the baseline's)
  -> training run (MLflow run, workdir, HPO trial) -> checkpoint step -> export (directory,
  parity, calling convention) -> gate record -> alias history -> model config files naming it

The join from traffic: every Predict/Classify/Regress response carries `model_spec.version`,
which is the registry version (version N is the directory N the server loaded), so
`lineage <name>/<response.model_spec.version>` explains any answer a server gave.
"""

from __future__ import annotations

import json
import os

from mlops import gate_record, model_card, registry_audit, registry_store


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_diff(config: dict, baseline_config: dict) -> dict[str, list]:
  """{dotted key: [baseline value, this value]} for every differing config field."""
  mine, theirs = _flatten(config), _flatten(baseline_config)
  return {
    k: [theirs.get(k), mine.get(k)]
    for k in sorted(set(mine) | set(theirs))
    if mine.get(k) != theirs.get(k)
  }


def lineage(mlflow_client, reference: str) -> dict:
  """The chain of the version `reference` (name@alias or name/version) names. Raises
  RegistryError for an unknown model, version or alias."""
  from mlops import registry
  from mlops.registry_promote import export_base_of

  version = registry_store.resolve_reference(mlflow_client, reference)
  name, number = version.name, int(version.version)
  tags, directory = version.tags, version.source
  manifest = model_card.manifest_of(directory)
  record_path = os.path.join(directory, gate_record.RECORD_JSON)
  record = model_card._read_json(record_path)
  baseline = record.get("baseline") if record else None
  diff = None
  if baseline:
    base_dir = mlflow_client.get_model_version(name, str(baseline)).source
    diff = config_diff(
      manifest.get("config", {}), model_card.manifest_of(base_dir).get("config", {})
    )
  export_base = export_base_of(mlflow_client, name)
  records = registry_audit.read(export_base)
  committed = {r["txn"] for r in records if r.get("event") == "commit"}
  history = [
    {k: r.get(k) for k in ("time", "user", "alias", "from", "to", "kind", "forced", "reason")}
    for r in records
    if r.get("event") == "begin"
    and r["txn"] in committed
    and r["name"] == name
    and number in (r["from"], r["to"])
  ]
  files = {
    path: {label: v for label, v in labels.items() if v == number}
    for path, labels in registry.config_file_labels(export_base, name).items()
  }
  return {
    "model": f"{name}/{number}",
    "data": {
      "source": manifest.get("config", {}).get("data", {}).get("name"),
      "fingerprint": manifest.get("data_fingerprint"),
      "test_fingerprint": record["data"]["fingerprint"] if record else None,
      "test_split": record["data"]["split"] if record else None,
    },
    "git": manifest.get("git"),
    "config_diff_vs_baseline": {"baseline": baseline, "diff": diff},
    "training_run": {
      "mlflow_run_id": tags.get("mlflow.run_id"),
      "workdir": manifest.get("workdir"),
      "hpo": {k: tags[k] for k in ("hpo.study", "hpo.trial") if k in tags} or None,
    },
    "checkpoint_step": manifest.get("checkpoint_step"),
    "export": {
      "directory": directory,
      "exists": os.path.isfile(os.path.join(directory, "saved_model.pb")),
      "parity": json.loads(tags.get("export.parity", "{}")),
      "calling_convention": tags.get("export.calling_convention"),
      "manifest_sha256": tags.get("export.manifest_sha256"),
    },
    "gate": {
      "verdict": tags.get("gate.verdict", "not validated"),
      "failed": [c for c in tags.get("gate.failed", "").split(",") if c],
      "baseline": baseline,
      "record": record_path if record else None,
    },
    "aliases_now": sorted(version.aliases),
    "alias_history": history,
    "model_config_files": {p: labels for p, labels in files.items() if labels},
    "model_card": os.path.join(directory, model_card.CARD),
    "join": "a served response's model_spec.version is this registry version",
  }


def render(mlflow_client, reference: str, *, as_json: bool = False) -> str:
  chain = lineage(mlflow_client, reference)
  if as_json:
    return json.dumps(chain, indent=2, sort_keys=False, default=str)
  diff = chain["config_diff_vs_baseline"]
  if diff["baseline"] is None:
    diff_text = "no baseline"
  else:
    changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff["diff"].items()) or "identical"
    diff_text = f"vs version {diff['baseline']}: {changes}"
  run = chain["training_run"]
  export = chain["export"]
  gate = chain["gate"]
  lines = [
    f"lineage of {chain['model']} ({reference})",
    f"  data         {chain['data']['source']}, fingerprint {chain['data']['fingerprint']}"
    + (
      f" (gate evaluated the {chain['data']['test_split']} split, {chain['data']['test_fingerprint']})"
      if chain["data"]["test_fingerprint"]
      else ""
    ),
    f"  -> code      git {(chain['git'] or {}).get('commit')} (dirty: {(chain['git'] or {}).get('dirty')})",
    f"  -> config    {diff_text}",
    f"  -> run       MLflow run {run['mlflow_run_id'] or 'not tracked'}, workdir {run['workdir']}"
    + (f", HPO {run['hpo']}" if run["hpo"] else ""),
    f"  -> step      {chain['checkpoint_step']}",
    f"  -> export    {export['directory']}{'' if export['exists'] else ' (GONE)'}, calling "
    f"convention {export['calling_convention']}, parity {export['parity']}",
    f"  -> gate      {gate['verdict']}"
    + (f" (failed: {', '.join(gate['failed'])})" if gate["failed"] else "")
    + (f", record {gate['record']}" if gate["record"] else ""),
    f"  -> aliases   now: {', '.join(chain['aliases_now']) or 'none'}",
  ]
  for move in chain["alias_history"]:
    forced = " FORCED" if move["forced"] else ""
    lines.append(
      f"               {move['time']} {move['user']}: {move['alias']} {move['from']} -> "
      f"{move['to']} ({move['kind']}{forced}) {move['reason'] or ''}".rstrip()
    )
  served = "; ".join(
    f"{p} ({', '.join(f'{k}={v}' for k, v in labels.items())})"
    for p, labels in chain["model_config_files"].items()
  )
  lines.append(f"  -> served by {served or 'no model config file written by promote'}")
  lines.append(f"  model card: {chain['model_card']}")
  lines.append(f"  ({chain['join']})")
  return "\n".join(lines)
