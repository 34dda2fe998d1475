"""Kubernetes manifests for a rollout on stock TF Serving: one Deployment + Service per arm, and
the mesh's weighted split and mirror (Istio VirtualService, or Gateway API HTTPRoute/GRPCRoute).

Written as plain dicts and dumped as YAML (no kfp, no helm): what `kubectl apply -f DIR` takes.

* Per arm (`stable`, optional `canary`, optional `shadow`): a ConfigMap holding TF Serving's
  `models.config` that pins the arm's version (`model_version_policy { specific }`), a
  Deployment of `tensorflow/serving` reading the model from a PersistentVolumeClaim, and a
  Service `<name>-<arm>` (gRPC 8500, REST 8501). Labels: `app: <name>`, `arm: <arm>`,
  `model-version: <version>`; selectors use `app` and `arm` only, so a new version of an arm
  rolls its pods without a new Service.
* A front Service `<name>` (the host clients call) selecting the stable arm's pods: without the
  mesh, traffic falls back to stable.
* Istio: one VirtualService for host `<name>` with one http rule per port (gRPC is HTTP/2, so
  Istio's http rules route it too): weighted `route` destinations, `mirror` and
  `mirrorPercentage`.
* Gateway API (the GAMMA mesh profile: a route whose parent is the front Service): an HTTPRoute for
  REST and a GRPCRoute for gRPC, each with weighted `backendRefs` and a `RequestMirror` filter
  with `percent` (GEP-3171).

A mesh splits per request, not per user: one user's requests land on both arms. Sticky
assignment needs this project's server or router (the traffic policy hashes a request key).
"""

from __future__ import annotations

import dataclasses
import re

ARMS = ("stable", "canary", "shadow")
MESHES = ("istio", "gateway")
GRPC_PORT = 8500
REST_PORT = 8501
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(ValueError):
  """Options that cannot make a consistent rollout; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """What to deploy. `versions` maps arm -> model version (stable required); `weight` is the
  canary's share of requests in percent; `mirror` names the arm that gets a copy of
  `mirror_percent` percent of the requests."""

  name: str
  versions: dict[str, int]
  weight: int = 0
  mirror: str | None = None
  mirror_percent: float = 100.0
  mesh: str = "istio"
  namespace: str | None = None
  image: str = "tensorflow/serving:2.21.0"
  models_pvc: str = "models"
  model_base_path: str | None = None  # default /models/<name>
  replicas: int = 1


def validate(spec: RolloutSpec) -> None:
  """Raises ManifestError for the first inconsistent option."""
  if not _DNS_LABEL.match(spec.name) or len(spec.name) > 50:
    raise ManifestError(
      f"--name={spec.name} is not a Kubernetes name; use lower-case letters, digits and '-' "
      "(at most 50 characters, so '<name>-canary' fits)"
    )
  if "stable" not in spec.versions:
    raise ManifestError("--stable=VERSION is required (the version serving most traffic)")
  for arm, version in spec.versions.items():
    if arm not in ARMS:
      raise ManifestError(f"arm {arm!r} is unknown; arms are {', '.join(ARMS)}")
    if not isinstance(version, int) or version < 1:
      raise ManifestError(f"--{arm}={version} is not a model version; give a positive integer")
  if not 0 <= spec.weight <= 100:
    raise ManifestError(f"--weight={spec.weight} must be a percentage from 0 to 100")
  if spec.weight and "canary" not in spec.versions:
    raise ManifestError(f"--weight={spec.weight} needs --canary=VERSION to send traffic to")
  if spec.mirror is not None:
    if spec.mirror not in spec.versions or spec.mirror == "stable":
      others = sorted(set(spec.versions) - {"stable"}) or ["none: give --shadow=VERSION"]
      raise ManifestError(f"--mirror={spec.mirror} is not a non-stable arm; choose from {others}")
    if not 0 < spec.mirror_percent <= 100:
      raise ManifestError(
        f"--mirror_percent={spec.mirror_percent:g} must be above 0 and at most 100"
      )
  if spec.mesh not in MESHES:
    raise ManifestError(f"--mesh={spec.mesh} is unknown; choose from {', '.join(MESHES)}")
  if spec.replicas < 1:
    raise ManifestError(f"--replicas={spec.replicas} must be at least 1")


def _metadata(spec: RolloutSpec, name: str, labels: dict[str, str]) -> dict:
  meta = {"name": name, "labels": labels}
  if spec.namespace:
    meta["namespace"] = spec.namespace
  return meta


def model_config(name: str, base_path: str, version: int) -> str:
  """TF Serving's ModelServerConfig text pinning one version."""
  return (
    "model_config_list {\n  config {\n"
    f'    name: "{name}"\n    base_path: "{base_path}"\n    model_platform: "tensorflow"\n'
    f"    model_version_policy {{ specific {{ versions: {version} }} }}\n  }}\n}}\n"
  )


def arm_manifests(spec: RolloutSpec, arm: str) -> list[dict]:
  """ConfigMap, Deployment and Service of one arm."""
  version = spec.versions[arm]
  full = f"{spec.name}-{arm}"
  selector = {"app": spec.name, "arm": arm}
  labels = {**selector, "model-version": str(version)}
  base_path = spec.model_base_path or f"/models/{spec.name}"
  config = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": _metadata(spec, f"{full}-config", labels),
    "data": {"models.config": model_config(spec.name, base_path, version)},
  }
  container = {
    "name": "tensorflow-serving",
    "image": spec.image,
    "args": [
      f"--port={GRPC_PORT}",
      f"--rest_api_port={REST_PORT}",
      "--model_config_file=/config/models.config",
      # jax2tf exports run on CPU only with XLA compilation on (README "Serving with the real
      # tensorflow_model_server").
      "--xla_cpu_compilation_enabled=true",
    ],
    "ports": [
      {"name": "grpc", "containerPort": GRPC_PORT},
      {"name": "http", "containerPort": REST_PORT},
    ],
    "readinessProbe": {
      "httpGet": {"path": f"/v1/models/{spec.name}/versions/{version}", "port": REST_PORT},
      "periodSeconds": 5,
    },
    "volumeMounts": [
      {"name": "config", "mountPath": "/config", "readOnly": True},
      {"name": "models", "mountPath": base_path, "subPath": spec.name, "readOnly": True},
    ],
  }
  deployment = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": _metadata(spec, full, labels),
    "spec": {
      "replicas": spec.replicas,
      "selector": {"matchLabels": selector},
      "template": {
        "metadata": {"labels": labels},
        "spec": {
          "containers": [container],
          "volumes": [
            {"name": "config", "configMap": {"name": f"{full}-config"}},
            {"name": "models", "persistentVolumeClaim": {"claimName": spec.models_pvc}},
          ],
        },
      },
    },
  }
  return [config, deployment, _service(spec, full, labels, selector)]


def _service(spec: RolloutSpec, name: str, labels: dict, selector: dict) -> dict:
  return {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": _metadata(spec, name, labels),
    "spec": {
      "selector": selector,
      "ports": [
        {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "appProtocol": "grpc"},
        {"name": "http", "port": REST_PORT, "targetPort": REST_PORT, "appProtocol": "http"},
      ],
    },
  }


def _weights(spec: RolloutSpec) -> list[tuple[str, int]]:
  weights = [("stable", 100 - spec.weight)]
  if "canary" in spec.versions:
    weights.append(("canary", spec.weight))
  return weights


def istio_virtual_service(spec: RolloutSpec) -> dict:
  rules = []
  for port_name, port in (("grpc", GRPC_PORT), ("http", REST_PORT)):
    rule = {
      "name": port_name,
      "match": [{"port": port}],
      "route": [
        {"destination": {"host": f"{spec.name}-{arm}", "port": {"number": port}}, "weight": w}
        for arm, w in _weights(spec)
      ],
    }
    if spec.mirror:
      rule["mirror"] = {"host": f"{spec.name}-{spec.mirror}", "port": {"number": port}}
      rule["mirrorPercentage"] = {"value": float(spec.mirror_percent)}
    rules.append(rule)
  return {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": _metadata(spec, spec.name, {"app": spec.name}),
    "spec": {"hosts": [spec.name], "http": rules},
  }


def gateway_routes(spec: RolloutSpec) -> list[dict]:
  """An HTTPRoute (REST) and a GRPCRoute (gRPC) attached to the front Service (GAMMA)."""
  routes = []
  for kind, port in (("GRPCRoute", GRPC_PORT), ("HTTPRoute", REST_PORT)):
    rule = {
      "backendRefs": [
        {"name": f"{spec.name}-{arm}", "port": port, "weight": w} for arm, w in _weights(spec)
      ]
    }
    if spec.mirror:
      # Gateway API takes an integer percent (or a fraction); keep exact values exact.
      percent = spec.mirror_percent
      mirror = {"backendRef": {"name": f"{spec.name}-{spec.mirror}", "port": port}}
      if float(percent).is_integer():
        mirror["percent"] = int(percent)
      else:
        mirror["fraction"] = {"numerator": round(percent * 1000), "denominator": 100_000}
      rule["filters"] = [{"type": "RequestMirror", "requestMirror": mirror}]
    suffix = "grpc" if kind == "GRPCRoute" else "http"
    routes.append(
      {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": _metadata(spec, f"{spec.name}-{suffix}", {"app": spec.name}),
        "spec": {
          "parentRefs": [{"group": "", "kind": "Service", "name": spec.name, "port": port}],
          "rules": [rule],
        },
      }
    )
  return routes


def build_files(spec: RolloutSpec) -> dict[str, list[dict]]:
  """The manifests grouped by file: `<name>-<arm>.yaml` per arm, `<name>-front.yaml` and
  `<name>-routing.yaml`. Raises ManifestError."""
  validate(spec)
  files = {
    f"{spec.name}-{arm}.yaml": arm_manifests(spec, arm) for arm in ARMS if arm in spec.versions
  }
  front = _service(spec, spec.name, {"app": spec.name}, {"app": spec.name, "arm": "stable"})
  files[f"{spec.name}-front.yaml"] = [front]
  routing = [istio_virtual_service(spec)] if spec.mesh == "istio" else gateway_routes(spec)
  files[f"{spec.name}-routing.yaml"] = routing
  return files


def build(spec: RolloutSpec) -> list[dict]:
  """Every manifest of the rollout, arms first. Raises ManifestError."""
  return [m for docs in build_files(spec).values() for m in docs]


def to_yaml(manifests: list[dict]) -> str:
  """One multi-document YAML stream (`---` between documents), keys in the order built, no
  anchors (a shared labels dict is written out each time), multi-line strings as `|` blocks."""
  import yaml

  class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
      return True

  def text(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

  Dumper.add_representer(str, text)
  return yaml.dump_all(manifests, Dumper=Dumper, sort_keys=False, default_flow_style=False)
