r"""Rollout commands.

  python -m mlops.rollout manifests --name=digits --stable=3 --canary=4 --weight=10 \
      [--shadow=5 --mirror=shadow --mirror_percent=100] [--mesh=istio|gateway] \
      [--namespace=NS] [--image=tensorflow/serving:2.21.0] [--models_pvc=models] --out=DIR

`manifests` writes Kubernetes YAML for stock TF Serving behind a mesh (mlops/rollout_manifests.py):
`<name>-<arm>.yaml` per arm (ConfigMap, Deployment, Service), `<name>-front.yaml` (the Service
clients call) and `<name>-routing.yaml` (Istio VirtualService, or Gateway API HTTPRoute +
GRPCRoute). Apply with `kubectl apply -f DIR`. A mesh split is per request, not sticky.

Exit status 0 with the files written, 1 with one `error: ...` line on bad input.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from absl import flags

from mlops import rollout_manifests
from mlops.rollout_manifests import ManifestError, RolloutSpec


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


# Subcommand -> handler(argv without the subcommand's name removed; argv[0] is "rollout <cmd>").
# The `canary` controller (issue 13, section 4) registers here when it is built.
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"manifests": manifests_main}


def main(argv: list[str]) -> int:
  """Runs `python -m mlops.rollout SUBCOMMAND [flags]`; returns the exit status."""
  try:
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
      given = argv[1] if len(argv) > 1 else "(none)"
      raise ManifestError(
        f"subcommand {given} is unknown; choose from {', '.join(SUBCOMMANDS)} "
        "(`canary` is not built yet)"
      )
    return SUBCOMMANDS[argv[1]]([f"{argv[0]} {argv[1]}", *argv[2:]])
  except (ManifestError, flags.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
