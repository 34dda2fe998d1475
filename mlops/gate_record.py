"""The gate record: every check with measured value, threshold and verdict, as JSON and as a
markdown table, stored with the version (`assets.extra/gate_record.{json,md}` in its directory,
`gate.*` tags on the MLflow model version, and artifacts of its training run when it has one)."""

from __future__ import annotations

import json
import os
import tempfile

from absl import logging

from serving import contract

RECORD_JSON = os.path.join(contract.ASSETS_EXTRA_DIR, "gate_record.json")
RECORD_MD = os.path.join(contract.ASSETS_EXTRA_DIR, "gate_record.md")


def markdown(record: dict) -> str:
  baseline = (
    f"version {record['baseline']} ({record['baseline_ref']})"
    if record["baseline"] is not None
    else f"none ({record['baseline_note']}): absolute checks only"
  )
  lines = [
    f"# Gate record: {record['name']} version {record['candidate']}",
    "",
    f"- verdict: **{record['verdict'].upper()}**"
    + (f" (failed: {', '.join(record['failed'])})" if record["failed"] else ""),
    f"- baseline: {baseline}",
    f"- test data: {record['data']['split']} split, {record['data']['size']} examples, "
    f"fingerprint `{record['data']['fingerprint']}`",
    f"- gate config: {record['gate_config']}; {record['seconds']:.1f} s",
    "",
    "| check | measured | threshold | verdict | detail |",
    "| --- | --- | --- | --- | --- |",
  ]
  for check in record["checks"]:
    measured = "" if check["measured"] is None else f"{check['measured']:.4g}"
    lines.append(
      f"| {check['name']} | {measured} | {check['threshold']} | {check['verdict']} | "
      f"{check['detail']} |"
    )
  return "\n".join(lines) + "\n"


def table(record: dict) -> str:
  """The checks as an aligned plain-text table, for the terminal."""
  rows = [("check", "measured", "threshold", "verdict")] + [
    (
      c["name"],
      "" if c["measured"] is None else f"{c['measured']:.4g}",
      c["threshold"],
      c["verdict"].upper() if c["verdict"] == "fail" else c["verdict"],
    )
    for c in record["checks"]
  ]
  widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
  return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def write_file(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def store(mlflow_client, record: dict, version_dir: str) -> str:
  """Writes the record beside the version and tags the version with its verdict. Returns the
  JSON's path."""
  json_path = os.path.join(version_dir, RECORD_JSON)
  write_file(json_path, json.dumps(record, indent=2, sort_keys=True))
  write_file(os.path.join(version_dir, RECORD_MD), markdown(record))
  name, version = record["name"], str(record["candidate"])
  tags = {
    "gate.verdict": record["verdict"],
    "gate.failed": ",".join(record["failed"]),
    "gate.record": json_path,
    "gate.baseline": str(record["baseline"]),
    "gate.test_fingerprint": record["data"]["fingerprint"],
  }
  for key, value in tags.items():
    mlflow_client.set_model_version_tag(name, version, key, value)
  log_to_run(
    mlflow_client,
    record["run_id"],
    [json_path, os.path.join(version_dir, RECORD_MD)],
    f"registry/{name}/{version}",
  )
  return json_path


def log_to_run(mlflow_client, run_id: str | None, paths: list[str], artifact_path: str) -> None:
  """Logs files as artifacts of the version's training run (skipped when it was not tracked or
  its artifact store is unreachable: the files beside the version are the record)."""
  if not run_id:
    return
  try:
    for path in paths:
      mlflow_client.log_artifact(run_id, path, artifact_path)
  except Exception as e:  # Any artifact-store failure: the record is already on disk.
    logging.warning("Could not log %s to run %s: %s", paths, run_id, e)
