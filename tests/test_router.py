"""Router mode (`python -m serving.router`): this project's server as the backend (digits as
stable=1 and canary=2), the router in front with a 50/50 sticky split, a 100% mirror to canary
and a prediction log. The response's model_spec.version tells which arm served."""

import collections
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the router needs grpcio (make install)")

from tensorflow_serving.apis import classification_pb2, get_model_status_pb2  # noqa: E402

from mlops import prediction_log  # noqa: E402
from serving.server import traffic  # noqa: E402
from tests.helpers import model_server, tf_examples  # noqa: E402
from tests.helpers.model_server import predict_request  # noqa: E402

LABELS = {"stable": 1, "canary": 2}
SPLIT = {"key": "x-user-id", "arms": [{"label": "stable", "weight": 50}, {"label": "canary", "weight": 50}]}  # fmt: skip


def _config(path, base: str, log_prefix: str | None = None) -> str:
  labels = " ".join(f"version_labels {{ key: '{k}' value: {v} }}" for k, v in LABELS.items())
  logging = ""
  if log_prefix:
    logging = (
      f"logging_config {{ log_collector_config {{ filename_prefix: '{log_prefix}' }}"
      " sampling_config { sampling_rate: 1.0 } }"
    )
  path.write_text(
    f"model_config_list {{ config {{ name: 'digits' base_path: '{base}' "
    f"model_version_policy {{ all {{}} }} {labels} {logging} }} }}"
  )
  return str(path)


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
  """(router, backend, router's log directory)."""
  _, version_dir = model_server.digits_export(tmp_path_factory)
  root = tmp_path_factory.mktemp("router")
  base = str(root / "models" / "digits")
  for version in LABELS.values():
    model_server.copy_version(version_dir, base, version)
  backend = model_server.Server(
    [*model_server.QUICK_ARGS, f"--model_config_file={_config(root / 'backend.config', base)}"],
    str(root / "backend.log"),
  )
  logs = root / "logs"
  router_config = _config(root / "router.config", base, str(logs / "predict"))
  policy = root / "traffic.json"
  policy.write_text(
    json.dumps(
      {"models": {"digits": {"split": SPLIT, "mirror": {"label": "canary", "percent": 100}}}}
    )
  )
  with backend:
    router = model_server.Server(
      [
        f"--backend=127.0.0.1:{backend.grpc_port}",
        f"--model_config_file={router_config}",
        f"--traffic_config_file={policy}",
      ],
      str(root / "router.log"),
      module="serving.router",
    )
    with router:
      yield router, backend, str(logs)


def _expected_arm(key: str) -> str:
  split = traffic.parse(json.dumps({"models": {"digits": {"split": SPLIT}}}), {"digits": set(LABELS)}, "t")  # fmt: skip
  return split["digits"].split.choose({"x-user-id": key})


def _predict(server, key: str | None = None, request_id: str | None = None, **spec):
  metadata = [("x-user-id", key)] if key else []
  if request_id:
    metadata.append(("x-request-id", request_id))
  request = predict_request(model_server.digits_pixels(2), **spec)
  response, call = server.predict_stub.Predict.with_call(request, metadata=metadata, timeout=30)
  return response, dict(call.trailing_metadata())


def test_split_sends_sticky_keys_to_their_arms(routed):
  router, _, _ = routed
  keys = [f"user-{i}" for i in range(16)]
  seen = set()
  for key in keys:
    arm = _expected_arm(key)
    seen.add(arm)
    for _ in range(2):
      response, trailing = _predict(router, key)
      assert trailing["x-arm"] == arm, key
      assert response.model_spec.version.value == LABELS[arm], key
  assert seen == set(LABELS)  # Both arms were exercised.


def test_an_explicit_label_or_version_bypasses_the_split(routed):
  router, _, _ = routed
  key = next(k for k in (f"u{i}" for i in range(100)) if _expected_arm(k) == "stable")
  response, trailing = _predict(router, key, version_label="canary")
  assert response.model_spec.version.value == 2 and "x-arm" not in trailing
  response, trailing = _predict(router, key, version=2)
  assert response.model_spec.version.value == 2 and "x-arm" not in trailing


def test_request_id_round_trip_and_logs_carry_arm_version_and_id(routed):
  router, _, logs = routed
  ids = {}
  for i in range(6):
    key = f"log-user-{i}"
    _, trailing = _predict(router, key, request_id=f"router-req-{i}")
    assert trailing["x-request-id"] == f"router-req-{i}"
    ids[f"router-req-{i}"] = _expected_arm(key)
  _, trailing = _predict(router, "someone")
  assert len(trailing["x-request-id"]) == 32  # Made by the router when the client sent none.

  def logged():
    try:
      read = prediction_log.read_logs(logs)
    except prediction_log.LogError:
      return None
    primary = {r for r, role in zip(read.request_id, read.role, strict=True) if role == "primary"}
    shadow = {r for r, role in zip(read.request_id, read.role, strict=True) if role == "shadow"}
    mirrored = {r for r, arm in ids.items() if arm == "stable"}  # canary is the mirror's label.
    return read if set(ids) <= primary and mirrored <= shadow else None

  assert set(ids.values()) == set(LABELS)  # Both arms among the logged requests.
  read = model_server.wait_for(logged, 30, "the router's log records")
  for request_id, arm in ids.items():
    rows = read.select((read.request_id == request_id) & (read.role == "primary"))
    assert set(rows.arm) == {arm} and set(rows.version) == {LABELS[arm]}
    assert set(rows.version_label) == {arm}
    shadow = read.select((read.request_id == request_id) & (read.role == "shadow"))
    if arm == "stable":  # Mirrored to canary, logged under the same id (2 rows a request).
      assert set(shadow.version) == {LABELS["canary"]} and len(shadow) == 2
    else:  # Served by the mirror's label already: no copy.
      assert len(shadow) == 0
  metrics = router.metrics_text()  # The server's metrics, counted by the router.
  assert 'serving_prediction_log_records_total{model="digits",outcome="written"}' in metrics
  assert 'serving_shadow_requests_total{model="digits",outcome="ok"}' in metrics


def test_status_metadata_and_rest_predict_pass_through(routed):
  router, backend, _ = routed
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = "digits"
  assert router.model_stub.GetModelStatus(request, timeout=30) == backend.model_stub.GetModelStatus(
    request, timeout=30
  )
  status, metadata = router.get("/v1/models/digits/labels/canary/metadata")
  assert status == 200 and metadata["model_spec"]["version"] == "2"
  assert "serving_default" in metadata["metadata"]["signature_def"]["signature_def"]
  rows = model_server.digits_pixels(2).tolist()
  body = json.dumps({"instances": rows}).encode()
  key = next(k for k in (f"r{i}" for i in range(100)) if _expected_arm(k) == "canary")
  http = urllib.request.Request(
    router.url + "/v1/models/digits:predict", body, {"x-user-id": key, "x-request-id": "rest-1"}
  )
  with urllib.request.urlopen(http, timeout=30) as response:
    assert response.headers["x-arm"] == "canary" and response.headers["x-request-id"] == "rest-1"
    routed_rows = json.loads(response.read())["predictions"]
  assert backend.request("POST", "/v1/models/digits/labels/canary:predict", body)[1] == {
    "predictions": routed_rows
  }


def test_classify_is_split_forwarded_logged_and_mirrored(routed):
  router, backend, logs = routed
  pixels = model_server.digits_pixels(3)
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name, request.model_spec.signature_name = "digits", "classify"
  request.input.example_list.examples.extend(tf_examples.example(inputs=row) for row in pixels)
  scores = {}
  for arm in LABELS:
    key = next(k for k in (f"c{i}" for i in range(100)) if _expected_arm(k) == arm)
    metadata = [("x-user-id", key), ("x-request-id", f"classify-{arm}")]
    response, call = router.predict_stub.Classify.with_call(request, metadata=metadata, timeout=30)
    assert response.model_spec.version.value == LABELS[arm]
    assert dict(call.trailing_metadata())["x-arm"] == arm
    direct = classification_pb2.ClassificationRequest()
    direct.CopyFrom(request)
    direct.model_spec.version_label = arm
    assert response.result == backend.predict_stub.Classify(direct, timeout=30).result
    scores[arm] = tf_examples.labels_and_scores(response.result)[1]

  def logged():
    read = prediction_log.read_logs(logs, rpc="Classify")
    ids = set(read.request_id[read.role == "primary"])
    return read if {"classify-stable", "classify-canary"} <= ids else None

  read = model_server.wait_for(logged, 30, "the router's Classify records")
  for arm in LABELS:
    rows = read.select((read.request_id == f"classify-{arm}") & (read.role == "primary"))
    assert set(rows.arm) == {arm} and set(rows.version) == {LABELS[arm]}
    np.testing.assert_array_equal(rows.inputs["inputs"], pixels)  # The Examples' features.
    np.testing.assert_allclose(rows.outputs["scores"], scores[arm], rtol=1e-6)
    np.testing.assert_array_equal(rows.outputs["classes"], scores[arm].argmax(1))

  def mirrored():  # stable's copy went to canary as a Predict of the classify signature.
    read = prediction_log.read_logs(logs, rpc="Classify")
    return read.select((read.request_id == "classify-stable") & (read.role == "shadow")) or None

  shadow = model_server.wait_for(mirrored, 30, "the mirrored Classify's record")
  assert set(shadow.version) == {LABELS["canary"]} and len(shadow) == len(pixels)
  np.testing.assert_allclose(shadow.outputs["scores"], scores["canary"], rtol=1e-5)


def test_rest_classify_is_split_and_forwarded(routed):
  router, backend, _ = routed
  body = {
    "signature_name": "classify",
    "examples": [{"inputs": row} for row in model_server.digits_pixels(3).tolist()],
  }
  for arm in LABELS:
    key = next(k for k in (f"r{i}" for i in range(100)) if _expected_arm(k) == arm)
    request = urllib.request.Request(
      f"{router.url}/v1/models/digits:classify", json.dumps(body).encode(), {"x-user-id": key}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
      assert answer.headers["x-arm"] == arm
      routed_result = json.loads(answer.read())
    status, direct = backend.request(
      "POST", f"/v1/models/digits/labels/{arm}:classify", json.dumps(body).encode()
    )
    assert status == 200 and routed_result == direct, (routed_result, direct)
  body["examples"] = [{"inputs": "not numbers"}]
  status, answer = router.request("POST", "/v1/models/digits:classify", json.dumps(body).encode())
  assert status == 400 and "inputs" in answer["error"], answer


def _one_arm(label: str) -> str:
  return json.dumps({"models": {"digits": {"split": {"arms": [{"label": label, "weight": 100}]}}}})


def test_a_backend_that_is_down_answers_unavailable_and_config_edits_apply(tmp_path):
  """No backend at all: every call is UNAVAILABLE (with its arm), the router lives on, and an
  edit of the model config (a new label) then of the traffic config (a split onto it) apply."""
  config = tmp_path / "models.config"
  config.write_text(
    "model_config_list { config { name: 'digits' base_path: '/unused'"
    " version_labels { key: 'stable' value: 1 } } }"
  )
  policy = tmp_path / "traffic.json"
  policy.write_text(_one_arm("stable"))
  router = model_server.Server(
    [
      f"--backend=127.0.0.1:{model_server.free_port()}",
      "--backend_timeout_seconds=5",
      f"--model_config_file={config}",
      "--model_config_file_poll_wait_seconds=1",
      f"--traffic_config_file={policy}",
      "--traffic_config_file_poll_wait_seconds=0.2",
    ],
    str(tmp_path / "router.log"),
    module="serving.router",
  )

  def arm_of_a_failed_call() -> str:
    with pytest.raises(grpc.RpcError) as error:
      router.predict_stub.Predict(predict_request(model_server.digits_pixels(1)), timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "backend 127.0.0.1:" in error.value.details()
    return dict(error.value.trailing_metadata())["x-arm"]

  try:

    def answers_503() -> bool:
      try:
        return router.get("/v1/models/digits")[0] == 503
      except OSError:  # The REST port is not open yet.
        return False

    model_server.wait_for(answers_503, 60, "REST status answering 503", 0.2)
    assert arm_of_a_failed_call() == "stable"
    policy.write_text(_one_arm("canary"))  # Refused: canary is no label yet.
    config.write_text(config.read_text().replace("} } }", "} version_labels { key: 'canary' value: 2 } } }"))  # fmt: skip
    model_server.wait_for(lambda: arm_of_a_failed_call() == "canary", 30, "the canary split", 0.2)
    assert router.proc.poll() is None  # Still serving.
  finally:
    assert router.stop() == 0
  assert "Traceback" not in router.log_text()


@pytest.mark.parametrize(
  "args, message",
  [
    (["--backend=h:1", "--traffic_config_file=/no/such.json"], "cannot read --traffic_config_file"),
  ],
)
def test_bad_flags_are_one_error_line(args, message):
  proc = subprocess.run(
    [sys.executable, "-m", "serving.router", *args],
    cwd=model_server.REPO,
    env=model_server.SERVER_ENV,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), proc.stderr
  assert not os.path.exists("/no/such.json")


def test_without_a_model_config_the_traffic_configs_labels_are_taken_and_still_checked():
  from serving.router import backend
  from serving.server import metrics

  policy = backend.RouterTrafficPolicy(backend.RouterModels(), metrics.Metrics())
  text = json.dumps({"models": {"digits": {"split": SPLIT, "mirror": {"label": "shadow", "percent": 5}}}})  # fmt: skip
  policy.apply(text, "t")
  assert policy.split_for("digits").labels == ("stable", "canary")
  assert policy.mirror_for("digits").label == "shadow"
  bad = {"key": "x-user-id", "arms": [{"label": "stable", "weight": 60}, {"label": "canary", "weight": 30}]}  # fmt: skip
  with pytest.raises(traffic.TrafficConfigError, match="sum to 90"):
    policy.apply(json.dumps({"models": {"digits": {"split": bad}}}), "t")
  assert policy.split_for("digits").labels == ("stable", "canary")  # The previous policy stays.
  with pytest.raises(traffic.TrafficConfigError, match="not JSON"):
    policy.apply("{", "t")


def test_the_clients_deadline_bounds_the_forwarded_call():
  """The router forwards with what is left of the client's deadline (never more than
  --backend_timeout_seconds), and a request whose deadline passed is not sent at all."""
  import time

  from serving.router import backend as router_backend
  from serving.server import grpc_api
  from serving.server.errors import ServingError

  timeouts = []

  def rpc(request, timeout, metadata):
    timeouts.append(timeout)
    return request

  forwarder = router_backend.Backend("127.0.0.1:1", timeout_seconds=30.0)
  assert forwarder.call(rpc, "r", "id", time.monotonic() + 2.0) == "r"
  assert 1.0 < timeouts[-1] <= 2.0
  forwarder.call(rpc, "r", "id")
  assert timeouts[-1] == 30.0
  forwarder.call(rpc, "r", "id", time.monotonic() + 100.0)
  assert timeouts[-1] == 30.0
  with pytest.raises(ServingError) as failed:
    forwarder.call(rpc, "r", "id", time.monotonic() - 0.1)
  assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and len(timeouts) == 3
  forwarder.close()

  class Call:  # The servicer context's two methods the server reads.
    def __init__(self, remaining):
      self.remaining = remaining

    def invocation_metadata(self):
      return [collections.namedtuple("Metadatum", "key value")("x-user-id", "u")]

    def time_remaining(self):
      return self.remaining

  with_deadline = grpc_api._caller(Call(5.0))
  assert with_deadline["headers"] == {"x-user-id": "u"}
  assert 4.0 < with_deadline["deadline"] - time.monotonic() <= 5.0
  assert grpc_api._caller(Call(None))["deadline"] is None
