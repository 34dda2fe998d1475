r"""The validation gate: a candidate version must pass it before `promote` may point canary or
production at it.

  python -m mlops.validate --name=digits --candidate=4 [--baseline=production] \
      [--gate=configs/gates/digits.py] [--check_tf_serving=2.20] [--allow_signature_change]

Quality on the pinned test split (paired statistics versus the baseline, gate_quality.py), the
served path through a real model server (gate_served.py), and compatibility (TF Serving release,
signatures unchanged). Prints the checks as a table and stores the gate record with the version
(gate_record.py). The first version of a model has no baseline: absolute checks only, and the
record says so. Exit 0 when the candidate passes, 2 when it fails a check, 1 for bad input.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time

from mlops.registry_store import RegistryError


def parser() -> argparse.ArgumentParser:
  # argparse, not absl flags: serving.export defines absl flags of the same names at import.
  root = argparse.ArgumentParser(
    prog="python -m mlops.validate", description=__doc__.split("\n")[0]
  )
  root.add_argument("--name", default="digits", help="Registered model name.")
  root.add_argument("--candidate", type=int, required=True, help="The version to validate.")
  root.add_argument("--baseline", default="production", help="An alias or a version number.")
  root.add_argument("--gate", help="Gate config file; default configs/gates/<digits|lm>.py.")
  root.add_argument("--check_tf_serving", help="TF Serving release (default: the gate's).")
  root.add_argument(
    "--allow_signature_change",
    action="store_true",
    help="Accept signatures that differ from the baseline's.",
  )
  return root


def load_gate_config(path: str):
  """`get_gate_config()` of the Python file at `path`. Raises RegistryError."""
  if not os.path.isfile(path):
    raise RegistryError(f"--gate={path} does not exist; see configs/gates/ for examples")
  spec = importlib.util.spec_from_file_location("gate_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_gate_config()
  except Exception as e:  # A user's config file: any failure in it is their bad input.
    raise RegistryError(f"--gate={path} failed to load: {type(e).__name__}: {e}") from e


def default_gate(kind: str) -> str:
  name = "lm" if kind == "language_model" else "digits"
  return os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "gates", f"{name}.py")


def resolve_baseline(mlflow_client, name: str, ref: str, candidate: int) -> tuple[int | None, str]:
  """(baseline version or None, why there is none)."""
  from mlops import registry_store

  if ref.isdigit():
    registry_store.model_version(mlflow_client, name, int(ref))
    version = int(ref)
  else:
    registry_store.check_alias(ref)
    version = registry_store.alias_version(mlflow_client, name, ref)
    if version is None:
      return None, f"{name}@{ref} names no version yet"
  if version == candidate:
    return None, f"the baseline {ref} is the candidate itself"
  return version, ""


def validate(
  mlflow_client,
  name: str,
  candidate: int,
  baseline_ref: str,
  gate_path: str | None,
  *,
  check_tf_serving: str | None = None,
  allow_signature_change: bool = False,
) -> dict:
  """Runs the gate; stores and returns the record. Raises RegistryError for bad input (unknown
  version, unreadable gate config, a baseline evaluated on other test data)."""
  from mlops import gate_compat, gate_quality, gate_record, gate_served, model_card
  from mlops.registry_promote import check_servable, export_base_of

  start = time.perf_counter()
  candidate_dir = check_servable(mlflow_client, name, candidate)
  export_base = export_base_of(mlflow_client, name)
  baseline, baseline_note = resolve_baseline(mlflow_client, name, baseline_ref, candidate)
  baseline_dir = check_servable(mlflow_client, name, baseline) if baseline else None
  tags = mlflow_client.get_model_version(name, str(candidate)).tags
  kind = model_card.manifest_of(candidate_dir).get("data_spec", {}).get("kind", "classification")
  gate_path = gate_path or default_gate(kind)
  gate = load_gate_config(gate_path)
  gate_quality.check_metric_names(gate, kind)
  model = gate_quality.restore(tags["workdir"], int(tags["checkpoint.step"]))
  evaluation = gate_quality.evaluate(model)
  base_eval = None
  if baseline is not None:
    base_tags = mlflow_client.get_model_version(name, str(baseline)).tags
    base_eval = gate_quality.evaluate(
      gate_quality.restore(base_tags["workdir"], int(base_tags["checkpoint.step"]))
    )
    recorded = base_tags.get("gate.test_fingerprint", base_eval.fingerprint)
    if evaluation.fingerprint not in (base_eval.fingerprint,) or recorded != base_eval.fingerprint:
      raise RegistryError(
        f"the baseline (version {baseline}) was evaluated on test data {recorded}, the candidate "
        f"on {evaluation.fingerprint}: compare versions trained on the same data "
        "(--baseline=<version>), or validate against no baseline with a new --name"
      )
  checks = gate_quality.quality_checks(gate, evaluation, base_eval)
  if gate.served.enabled:
    golden, expected = gate_compat.golden(model, gate)
    checks += gate_served.served_checks(
      gate, name, export_base, candidate, baseline, golden, expected
    )
  checks += gate_compat.checks(
    candidate_dir,
    baseline_dir,
    check_tf_serving or gate.compatibility.tf_serving,
    allow_signature_change or gate.compatibility.allow_signature_change,
  )
  failed = [c["name"] for c in checks if c["verdict"] == "fail"]
  record = {
    "name": name,
    "candidate": candidate,
    "baseline": baseline,
    "baseline_ref": baseline_ref,
    "baseline_note": baseline_note,
    "gate_config": os.path.abspath(gate_path),
    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "run_id": tags.get("mlflow.run_id"),
    "data": {
      "split": evaluation.split,
      "size": len(evaluation.losses),
      "train_size": evaluation.train_size,
      "fingerprint": evaluation.fingerprint,
    },
    "metrics": {m: evaluation.metric(m) for m in gate_quality.METRICS[kind]},
    "baseline_metrics": (
      {m: base_eval.metric(m) for m in gate_quality.METRICS[kind]} if base_eval else None
    ),
    "classifier": gate_quality.classifier_summary(evaluation) if kind == "classification" else None,
    "checks": checks,
    "failed": failed,
    "verdict": "fail" if failed else "pass",
  }
  record["seconds"] = time.perf_counter() - start
  gate_record.store(mlflow_client, record, candidate_dir)
  model_card.write(mlflow_client, name, candidate, candidate_dir)
  return record


def main(argv: list[str] | None = None) -> None:
  from mlops import gate_record, registry_store
  from trainer import log_filter
  from trainer.errors import ConfigError

  args = parser().parse_args(argv)
  log_filter.quiet_library_info_logs()
  try:
    client = registry_store.client()
    record = validate(
      client,
      args.name,
      args.candidate,
      args.baseline,
      args.gate,
      check_tf_serving=args.check_tf_serving,
      allow_signature_change=args.allow_signature_change,
    )
  except (RegistryError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  name, candidate = record["name"], record["candidate"]
  if record["baseline"] is None:
    print(
      f"{name} version {candidate}: no baseline ({record['baseline_note']}): absolute checks only"
    )
  else:
    print(
      f"{name} version {candidate} against version {record['baseline']} ({record['baseline_ref']})"
    )
  print(gate_record.table(record))
  failed = f" (failed: {', '.join(record['failed'])})" if record["failed"] else ""
  path = client.get_model_version(name, str(candidate)).tags["gate.record"]
  print(
    f"verdict: {record['verdict'].upper()}{failed} in {record['seconds']:.1f} s; record: {path}"
  )
  sys.exit(0 if record["verdict"] == "pass" else 2)


if __name__ == "__main__":
  from serving import native_logs

  native_logs.quiet_native_logs(sys.argv)
  main()
