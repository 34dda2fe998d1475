"""`python -m mlops.rollout manifests`: the YAML parses, and names, labels, selectors, ports,
weights and mirrors are consistent across the Deployments, Services and the mesh's routes."""

import os

import yaml  # requirements.lock

from mlops import rollout


def _write(tmp_path, *flags):
  out = tmp_path / "out"
  argv = ["rollout", "manifests", "--name=digits", "--stable=3", *flags, f"--out={out}"]
  assert rollout.main(argv) == 0
  docs = []
  for name in sorted(os.listdir(out)):
    with open(out / name) as f:
      docs += [(name, d) for d in yaml.safe_load_all(f)]
  return docs


def _by_kind(docs, kind):
  return {d["metadata"]["name"]: d for _, d in docs if d["kind"] == kind}


def _check_arms(docs, versions):
  """Each arm: ConfigMap pinning its version, Deployment whose selector matches its pods, and a
  Service selecting exactly those pods on the container's named ports."""
  deployments, services = _by_kind(docs, "Deployment"), _by_kind(docs, "Service")
  configs = _by_kind(docs, "ConfigMap")
  assert set(deployments) == {f"digits-{arm}" for arm in versions}
  for arm, version in versions.items():
    deployment = deployments[f"digits-{arm}"]
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"app": "digits", "arm": arm}
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["model-version"] == str(version)
    service = services[f"digits-{arm}"]
    assert service["spec"]["selector"] == selector
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == ports
    (config_volume,) = [v for v in pod["spec"]["volumes"] if "configMap" in v]
    config = configs[config_volume["configMap"]["name"]]["data"]["models.config"]
    _assert_pins(config, version)
    assert "--model_config_file=/config/models.config" in container["args"]
  # The front Service clients call falls back to the stable pods.
  assert services["digits"]["spec"]["selector"] == {"app": "digits", "arm": "stable"}
  return services


def _assert_pins(text, version):
  try:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2
  except ImportError:  # Training-only install: check the text.
    assert f"specific {{ versions: {version} }}" in text
    return
  config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
  (model,) = config.model_config_list.config
  assert model.name == "digits" and list(model.model_version_policy.specific.versions) == [version]


def _service_ports(service):
  return {p["port"] for p in service["spec"]["ports"]}


def test_istio_split_and_mirror(tmp_path):
  docs = _write(tmp_path, "--canary=4", "--weight=10", "--shadow=5", "--mirror=shadow")
  services = _check_arms(docs, {"stable": 3, "canary": 4, "shadow": 5})
  (vs,) = _by_kind(docs, "VirtualService").values()
  assert vs["apiVersion"] == "networking.istio.io/v1" and vs["spec"]["hosts"] == ["digits"]
  rules = vs["spec"]["http"]
  assert sorted(r["match"][0]["port"] for r in rules) == [8500, 8501]
  for rule in rules:
    port = rule["match"][0]["port"]
    weights = {r["destination"]["host"]: r["weight"] for r in rule["route"]}
    assert weights == {"digits-stable": 90, "digits-canary": 10}
    assert sum(weights.values()) == 100
    for route in rule["route"]:
      assert route["destination"]["port"]["number"] == port
      assert port in _service_ports(services[route["destination"]["host"]])
    assert rule["mirror"] == {"host": "digits-shadow", "port": {"number": port}}
    assert rule["mirrorPercentage"] == {"value": 100.0}
  assert not _by_kind(docs, "HTTPRoute")


def test_gateway_api_routes_with_a_fractional_mirror(tmp_path):
  docs = _write(
    tmp_path,
    "--canary=4",
    "--weight=25",
    "--mirror=canary",
    "--mirror_percent=12.5",
    "--mesh=gateway",
    "--namespace=ml",
  )
  services = _check_arms(docs, {"stable": 3, "canary": 4})
  assert {d["metadata"]["namespace"] for _, d in docs} == {"ml"}
  routes = {**_by_kind(docs, "HTTPRoute"), **_by_kind(docs, "GRPCRoute")}
  assert sorted(d["kind"] for d in routes.values()) == ["GRPCRoute", "HTTPRoute"]
  for route in routes.values():
    (parent,) = route["spec"]["parentRefs"]
    assert (parent["kind"], parent["name"]) == ("Service", "digits")  # GAMMA: the front Service
    port = parent["port"]
    assert port == (8500 if route["kind"] == "GRPCRoute" else 8501)
    (rule,) = route["spec"]["rules"]
    weights = {b["name"]: b["weight"] for b in rule["backendRefs"]}
    assert weights == {"digits-stable": 75, "digits-canary": 25}
    assert all(port in _service_ports(services[b["name"]]) for b in rule["backendRefs"])
    ((mirror_filter),) = rule["filters"]
    assert mirror_filter["type"] == "RequestMirror"
    mirror = mirror_filter["requestMirror"]
    assert mirror["backendRef"] == {"name": "digits-canary", "port": port}
    assert mirror["fraction"]["numerator"] / mirror["fraction"]["denominator"] == 0.125
  assert not _by_kind(docs, "VirtualService")


def test_stable_only_takes_all_traffic(tmp_path):
  docs = _write(tmp_path)
  _check_arms(docs, {"stable": 3})
  (vs,) = _by_kind(docs, "VirtualService").values()
  for rule in vs["spec"]["http"]:
    assert [r["weight"] for r in rule["route"]] == [100] and "mirror" not in rule


def test_bad_options_are_one_error_line_and_write_nothing(tmp_path, capsys):
  cases = {
    "--stable=3 --canary=4 --weight=120": "--weight=120 must be a percentage",
    "--stable=3 --weight=10": "--weight=10 needs --canary=VERSION",
    "--stable=3 --mirror=shadow": "--mirror=shadow is not a non-stable arm",
    "--stable=3 --shadow=5 --mirror=shadow --mirror_percent=0": "--mirror_percent=0 must be",
    "--stable=3 --shadow=5 --mirror=shadow --mirror_percent=150": "--mirror_percent=150",
    "--stable=3 --mesh=linkerd": "--mesh=linkerd is unknown",
    "--stable=0": "--stable=0 is not a model version",
    "--canary=4": "--stable=VERSION is required",
    "--stable=three": "--stable",
  }
  for flags, message in cases.items():
    argv = ["rollout", "manifests", "--name=digits", *flags.split(), f"--out={tmp_path}/o"]
    assert rollout.main(argv) == 1, flags
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (flags, err)
  for argv, message in (
    (["rollout", "manifests", "--name=Digits_1", "--stable=3", f"--out={tmp_path}/o"], "--name"),
    (["rollout", "canary", "--name=digits"], "--candidate, --logs, --traffic_config_file"),
    (["rollout"], "subcommand (none) is unknown"),
  ):
    assert rollout.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
  assert not os.path.exists(tmp_path / "o")
