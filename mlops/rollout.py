r"""Rollout commands.

  python -m mlops.rollout manifests --name=digits --stable=3 --canary=4 --weight=10 \
      [--shadow=5 --mirror=shadow --mirror_percent=100] [--mesh=istio|gateway] \
      [--namespace=NS] [--image=tensorflow/serving:2.21.0] [--models_pvc=models] --out=DIR

`manifests` writes Kubernetes YAML for stock TF Serving behind a mesh (mlops/rollout_manifests.py):
`<name>-<arm>.yaml` per arm (ConfigMap, Deployment, Service), `<name>-front.yaml` (the Service
clients call) and `<name>-routing.yaml` (Istio VirtualService, or Gateway API HTTPRoute +
GRPCRoute). Apply with `kubectl apply -f DIR`. A mesh split is per request, not sticky.

  python -m mlops.rollout canary --name=digits --candidate=4 --logs=DIR \
      --traffic_config_file=traffic.json --model_config_file=models.config [--server=HOST:PORT] \
      [--step_weight=10 --max_weight=50 --interval_s=60 --threshold=5 --min_requests=100]

`canary` runs the metric-driven canary controller (mlops/canary.py, Flagger's semantics): the
canary label moves to the gated candidate, its split weight rises by --step_weight every
interval while canary-vs-stable checks on that interval's prediction logs pass, and it is
promoted (production moves) at --max_weight or rolled back at --threshold failed checks. One
controller runs per model at a time (`EXPORT_BASE/canary.lock`); a second one exits 1.

Exit status 0 with the files written (`canary`: promoted), 2 when a canary was rolled back,
1 with one `error: ...` line on bad input (nothing moved).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from absl import flags

from mlops import cli_help, rollout_manifests
from mlops.rollout_manifests import ManifestError, RolloutSpec

CANARY_LOCK = "canary.lock"  # In the model's export base, beside registry_audit.jsonl.


def _manifest_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("name", None, "Model name (Kubernetes name prefix).", flag_values=fv)
  for arm, help_text in (
    ("stable", "Version serving the rest of the traffic (required)."),
    ("canary", "Version getting --weight percent of the requests."),
    ("shadow", "Version that only receives mirrored copies."),
  ):
    flags.DEFINE_integer(arm, None, help_text, flag_values=fv)
  flags.DEFINE_integer("weight", 0, "Canary share of requests, percent.", flag_values=fv)
  flags.DEFINE_string("mirror", None, "Arm receiving mirrored copies.", flag_values=fv)
  flags.DEFINE_float("mirror_percent", 100.0, "Percent of requests mirrored.", flag_values=fv)
  flags.DEFINE_string("mesh", "istio", "istio or gateway.", flag_values=fv)
  flags.DEFINE_string("namespace", None, "Namespace (default: kubectl's).", flag_values=fv)
  flags.DEFINE_string("image", RolloutSpec.image, "TF Serving image.", flag_values=fv)
  flags.DEFINE_string("models_pvc", "models", "PVC holding <name>/<version>/.", flag_values=fv)
  flags.DEFINE_integer("replicas", 1, "Pods per arm.", flag_values=fv)
  flags.DEFINE_string("out", None, "Directory to write the YAML files into.", flag_values=fv)
  return fv


def write_manifests(spec: RolloutSpec, out: str) -> list[str]:
  """Writes the YAML files into `out` (staged, then moved in, so a failure leaves nothing
  half-written); returns their paths. Raises ManifestError."""
  groups = rollout_manifests.build_files(spec)
  os.makedirs(out, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".manifests-", dir=out)
  try:
    for name, docs in groups.items():
      with open(os.path.join(staging, name), "w") as f:
        f.write(rollout_manifests.to_yaml(docs))
    paths = []
    for name in groups:
      paths.append(os.path.join(out, name))
      os.replace(os.path.join(staging, name), paths[-1])
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return paths


def manifests_main(argv: list[str]) -> int:
  fv = _manifest_flags()
  rest = fv(argv)
  if len(rest) > 1:
    raise ManifestError(f"unexpected arguments: {rest[1:]}")
  if not fv.name or not fv.out:
    raise ManifestError("--name=MODEL and --out=DIR are required")
  versions = {arm: getattr(fv, arm) for arm in rollout_manifests.ARMS}
  spec = RolloutSpec(
    name=fv.name,
    versions={arm: v for arm, v in versions.items() if v is not None},
    weight=fv.weight,
    mirror=fv.mirror,
    mirror_percent=fv.mirror_percent,
    mesh=fv.mesh,
    namespace=fv.namespace,
    image=fv.image,
    models_pvc=fv.models_pvc,
    replicas=fv.replicas,
  )
  for path in write_manifests(spec, fv.out):
    print(path)
  return 0


def _canary_flags() -> flags.FlagValues:
  from mlops.canary import CanarySpec
  from mlops.canary_checks import Thresholds

  fv = flags.FlagValues()
  spec, t = CanarySpec("", 0), Thresholds()
  flags.DEFINE_string("name", None, "Registered model name.", flag_values=fv)
  flags.DEFINE_integer("candidate", None, "Registry version to canary (gated).", flag_values=fv)
  flags.DEFINE_string("logs", None, "The server's prediction log directory.", flag_values=fv)
  flags.DEFINE_string("traffic_config_file", None, "The server's traffic config.", flag_values=fv)
  flags.DEFINE_string("model_config_file", None, "The server's model config.", flag_values=fv)
  flags.DEFINE_string("server", None, "host:port to reload and wait for.", flag_values=fv)
  flags.DEFINE_string("feedback", None, "Labels CSV/JSONL (request_id,label).", flag_values=fv)
  flags.DEFINE_string("out", None, "Report directory; default LOGS/canary.", flag_values=fv)
  integers = {
    "step_weight": (spec.step_weight, "Percent added to the canary per passing interval."),
    "max_weight": (spec.max_weight, "Percent at which a passing interval promotes."),
    "threshold": (spec.threshold, "Failed checks that roll back."),
    "min_requests": (t.min_requests, "Fewer requests per arm per interval fail the check."),
    "min_labels": (t.min_labels, "Labelled rows per arm needed to judge accuracy."),
  }
  for name, (default, help_text) in integers.items():
    flags.DEFINE_integer(name, default, help_text, flag_values=fv)
  flags.DEFINE_integer("max_intervals", None, "Stop (roll back) after this many.", flag_values=fv)
  floats = {
    "interval_s": (spec.interval_s, "Seconds per interval (fractions allowed)."),
    "settle_s": (spec.settle_s, "Seconds between weight 0 and removing the label."),
    "max_error_rate_increase": (t.max_error_rate_increase, "Canary minus stable error rate."),
    "max_latency_ratio": (t.max_latency_ratio, "Canary p99 / stable p99."),
    "max_divergence": (t.max_divergence, "Jensen-Shannon distance of predicted classes."),
    "divergence_alpha": (t.divergence_alpha, "G-test level the divergence must also pass."),
    "max_accuracy_drop": (t.max_accuracy_drop, "Stable minus canary labelled accuracy."),
  }
  for name, (default, help_text) in floats.items():
    flags.DEFINE_float(name, default, help_text, flag_values=fv)
  flags.DEFINE_string("stable_label", spec.stable_label, "Label of the stable arm.", flag_values=fv)
  flags.DEFINE_string("split_key", spec.split_key, "Header the split hashes.", flag_values=fv)
  return fv


def _canary_spec(fv: flags.FlagValues):
  from mlops.canary import CanaryError, CanarySpec
  from mlops.canary_checks import Thresholds

  missing = [f"--{n}" for n in ("name", "candidate", "logs") if getattr(fv, n) is None]
  missing += [f"--{n}" for n in ("traffic_config_file", "model_config_file") if not getattr(fv, n)]
  if missing:
    raise CanaryError(f"{', '.join(missing)} required (see --helpfull)")
  names = [f.name for f in dataclasses.fields(Thresholds)]
  spec = CanarySpec(
    name=fv.name,
    candidate=fv.candidate,
    **{k: getattr(fv, k) for k in ("step_weight", "max_weight", "interval_s", "threshold")},
    max_intervals=fv.max_intervals,
    stable_label=fv.stable_label,
    split_key=fv.split_key,
    settle_s=fv.settle_s,
    thresholds=Thresholds(**{k: getattr(fv, k) for k in names}),
  )
  spec.validate()
  if not os.path.isdir(fv.logs):
    raise CanaryError(f"--logs={fv.logs} is not a directory; give the server's prediction log dir")
  if fv.feedback and not os.path.isfile(fv.feedback):
    raise CanaryError(f"--feedback={fv.feedback} is not a file")
  return spec


def canary_main(argv: list[str]) -> int:
  """`rollout canary`: 0 promoted, 2 rolled back; raises CanaryError and friends on bad input."""
  from mlops import (
    canary,
    canary_registry,
    canary_report,
    canary_traffic,
    pipeline_guards,
    registry_store,
  )

  fv = _canary_flags()
  rest = fv(argv)
  if len(rest) > 1:
    raise canary.CanaryError(f"unexpected arguments: {rest[1:]}")
  spec = _canary_spec(fv)
  canary_traffic.read(fv.traffic_config_file)
  rollout = canary_registry.RegistryRollout(
    registry_store.client(), spec, fv.model_config_file, fv.server
  )
  stable = rollout.preflight()
  out = fv.out or os.path.join(fv.logs, "canary")

  def on_update(outcome) -> None:
    canary_report.write(outcome, out)
    if outcome.intervals and outcome.result == "running":
      last = outcome.intervals[-1]
      failed = [c["name"] for c in last.checks if c["verdict"] == "fail"]
      print(
        f"interval {last.number}: weight {last.weight}% {'passed' if last.passed else 'failed'}"
        + (f" ({', '.join(failed)})" if failed else "")
        + f" -> {last.action} to {last.next_weight}%",
        flush=True,
      )

  controller = canary.Controller(
    spec,
    rollout,
    fv.traffic_config_file,
    canary.log_measure(fv.logs, spec, fv.feedback),
    on_update=on_update,
  )
  # Two controllers on one model would fight over its weights and labels: one at a time, per
  # model (the lock sits beside the registry audit log; a crashed controller's lock is stale).
  with pipeline_guards.PipelineLock(
    os.path.join(rollout.export_base, CANARY_LOCK), what=f"a canary of {spec.name}"
  ):
    outcome = controller.run()
  print(
    f"{spec.name} version {spec.candidate} (stable {stable}): {outcome.result.replace('_', ' ')} "
    f"after {len(outcome.intervals)} intervals ({outcome.reason}); report {out}/canary.md"
  )
  return 0 if outcome.result == "promoted" else 2


# Subcommand -> handler(argv without the subcommand's name removed; argv[0] is "rollout <cmd>").
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
  "manifests": manifests_main,
  "canary": canary_main,
}


# Subcommand -> its flags, for --help / --helpfull.
_FLAGS: dict[str, Callable[[], flags.FlagValues]] = {
  "manifests": _manifest_flags,
  "canary": _canary_flags,
}


def _canary_errors() -> tuple[type[Exception], ...]:
  """Bad-input errors of the canary's layers (one `error:` line each)."""
  from mlops.canary import CanaryError
  from mlops.canary_traffic import TrafficFileError
  from mlops.pipeline_guards import GuardError
  from mlops.prediction_log import LogError
  from mlops.registry_store import RegistryError

  return (CanaryError, TrafficFileError, LogError, RegistryError, TimeoutError, GuardError)


def main(argv: list[str]) -> int:
  """Runs `python -m mlops.rollout SUBCOMMAND [flags]`; returns the exit status."""
  if argv[1:2] and cli_help.help_requested(argv[1:2]):
    print(
      f"{(__doc__ or '').strip()}\n\nSubcommands: {', '.join(SUBCOMMANDS)}; see SUBCOMMAND --help."
    )
    return 0
  try:
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
      given = argv[1] if len(argv) > 1 else "(none)"
      raise ManifestError(f"subcommand {given} is unknown; choose from {', '.join(SUBCOMMANDS)}")
    if cli_help.help_requested(argv[2:]):
      print(cli_help.help_text(f"python -m mlops.rollout {argv[1]} [flags]", _FLAGS[argv[1]]()))
      return 0
    return SUBCOMMANDS[argv[1]]([f"{argv[0]} {argv[1]}", *argv[2:]])
  except (ManifestError, flags.Error, *_canary_errors()) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  if sys.argv[1:2] == ["canary"]:  # The canary reads TF Serving's protos: quiet TF's start-up.
    from serving import native_logs
    from trainer import log_filter

    native_logs.quiet_native_logs(sys.argv, import_tensorflow=False)
    log_filter.quiet_library_info_logs()
  sys.exit(main(sys.argv))
