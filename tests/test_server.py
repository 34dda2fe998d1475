"""The model server in a subprocess on 127.0.0.1: gRPC and REST equal JAX, TF Serving's status
codes for bad requests, hot swaps without a failed request, a bounded load test, SIGTERM."""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from tensorflow_serving.apis import (  # noqa: E402
  get_model_metadata_pb2,
  get_model_status_pb2,
  inference_pb2,
  predict_pb2,
)

from configs import lm as lm_config  # noqa: E402
from serving.export import exporter as export  # noqa: E402
from serving.export import loading  # noqa: E402
from serving.server import model_config, model_manager  # noqa: E402
from serving.server import rest_api as rest  # noqa: E402
from tests.helpers import model_server  # noqa: E402
from tests.helpers.configs import smoke_config  # noqa: E402
from trainer import train  # noqa: E402

POLL_SECONDS = 0.5
MAX_REQUEST_BYTES = 1 << 20
LOAD_RETRY_SECONDS = 1.0


class Server(model_server.Server):
  """The server these tests run: quick polls and load retries, a small request size limit."""

  def __init__(self, base: str, log_path: str, model_name: str = "digits", models_args=None):
    """Serves `base` as `model_name` (labelled stable=1), or what `models_args` configure."""
    self.base = base
    super().__init__(
      [
        f"--file_system_poll_wait_seconds={POLL_SECONDS}",
        f"--max_request_size_bytes={MAX_REQUEST_BYTES}",
        f"--load_retry_interval_micros={int(LOAD_RETRY_SECONDS * 1e6)}",
        "--max_num_load_retries=100",
        *(
          models_args
          or [
            f"--model_name={model_name}",
            f"--model_base_path={base}",
            "--version_labels=stable=1",
          ]
        ),
      ],
      log_path,
      model_name=model_name,
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits")
  train.train_and_evaluate(smoke_config({}), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def server(digits_run, tmp_path_factory):
  base = tmp_path_factory.mktemp("models") / "digits"
  export.export(digits_run, str(base))
  with Server(str(base), str(tmp_path_factory.mktemp("logs") / "server.log")) as server:
    yield server


@pytest.fixture(scope="module")
def pixels():
  return model_server.digits_pixels()


@pytest.fixture(scope="module")
def expected(digits_run, pixels):
  return model_server.jax_digits_outputs(digits_run, pixels)


def _predict_request(inputs, input_name="inputs", **spec) -> predict_pb2.PredictRequest:
  request = predict_pb2.PredictRequest()
  request.model_spec.name = spec.pop("name", "digits")
  if "version" in spec:
    request.model_spec.version.value = spec.pop("version")
  if "version_label" in spec:  # Setting it, even to "", clears `version` (a oneof).
    request.model_spec.version_label = spec.pop("version_label")
  request.model_spec.signature_name = spec.pop("signature_name", "")
  request.output_filter.extend(spec.pop("output_filter", []))
  assert not spec, spec
  request.inputs[input_name].CopyFrom(tf.make_tensor_proto(inputs))
  return request


def _check_outputs(outputs, expected, rows=slice(None)):
  np.testing.assert_allclose(
    np.asarray(outputs["probabilities"]), expected["probabilities"][rows], rtol=1e-5, atol=1e-7
  )
  np.testing.assert_array_equal(np.asarray(outputs["classes"]), expected["classes"][rows])


def test_grpc_predict_matches_jax(server, pixels, expected):
  response = server.predict_stub.Predict(_predict_request(pixels), timeout=30)
  assert response.model_spec.name == "digits"
  assert response.model_spec.version.value == 1
  assert response.model_spec.signature_name == "serving_default"
  _check_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()}, expected)

  by_label = server.predict_stub.Predict(
    _predict_request(pixels[:3], version_label="stable", output_filter=["classes"]), timeout=30
  )
  assert list(by_label.outputs) == ["classes"] and by_label.model_spec.version.value == 1
  np.testing.assert_array_equal(
    tf.make_ndarray(by_label.outputs["classes"]), expected["classes"][:3]
  )


def test_rest_predict_row_and_columnar_match_jax(server, pixels, expected):
  body = json.dumps({"instances": pixels[:5].tolist()}).encode()
  status, rows = server.request("POST", "/v1/models/digits:predict", body)
  assert status == 200, rows
  _check_outputs(
    {k: [row[k] for row in rows["predictions"]] for k in ("probabilities", "classes")},
    expected,
    slice(5),
  )

  named_rows = [{"inputs": row} for row in pixels[:2].tolist()]
  status, result = server.request(
    "POST", "/v1/models/digits/versions/1:predict", json.dumps({"instances": named_rows}).encode()
  )
  assert status == 200 and len(result["predictions"]) == 2

  body = json.dumps({"signature_name": "serving_default", "inputs": pixels.tolist()}).encode()
  status, columns = server.request("POST", "/v1/models/digits/labels/stable:predict", body)
  assert status == 200, columns
  _check_outputs(columns["outputs"], expected)


def test_metadata_and_status(server):
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
  request.model_spec.name = "digits"
  response = server.predict_stub.GetModelMetadata(request, timeout=30)
  assert response.model_spec.version.value == 1
  signature_defs = get_model_metadata_pb2.SignatureDefMap()
  assert response.metadata["signature_def"].Unpack(signature_defs)
  signature = signature_defs.signature_def["serving_default"]
  assert signature.method_name == "tensorflow/serving/predict"
  assert [d.size for d in signature.inputs["inputs"].tensor_shape.dim] == [-1, 64]
  assert signature.outputs["classes"].dtype == tf.int32.as_datatype_enum

  status, metadata = server.get("/v1/models/digits/versions/1/metadata")
  assert status == 200
  assert metadata["model_spec"] == {"name": "digits", "signature_name": "", "version": "1"}
  rest_signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
  assert rest_signature["inputs"]["inputs"]["dtype"] == "DT_FLOAT"

  status_request = get_model_status_pb2.GetModelStatusRequest()
  status_request.model_spec.name = "digits"
  versions = server.model_stub.GetModelStatus(status_request, timeout=30).model_version_status
  assert [(v.version, v.state, v.status.error_code) for v in versions] == [
    (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)
  ]
  assert server.get("/v1/models/digits") == (
    200,
    {
      "model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
      ]
    },
  )


def _bad_tensor(request):
  request.inputs["inputs"].tensor_content = b"abc"  # Not a whole float32.
  return request


GOOD = np.ones((2, 64), np.float32)
BAD_GRPC = [
  ("unknown model", lambda: _predict_request(GOOD, name="nope"), "NOT_FOUND", "nope"),
  ("model as path", lambda: _predict_request(GOOD, name="../digits"), "NOT_FOUND", ""),
  ("unknown version", lambda: _predict_request(GOOD, version=99), "NOT_FOUND", "99"),
  ("unknown label", lambda: _predict_request(GOOD, version_label="canary"), "INVALID_ARGUMENT", ""),
  (
    "unknown signature",
    lambda: _predict_request(GOOD, signature_name="generate"),
    "FAILED_PRECONDITION",
    "generate",
  ),
  (
    "unknown output",
    lambda: _predict_request(GOOD, output_filter=["logits"]),
    "INVALID_ARGUMENT",
    "logits",
  ),
  ("wrong dtype", lambda: _predict_request(GOOD.astype(np.int32)), "INVALID_ARGUMENT", "float"),
  ("wrong shape", lambda: _predict_request(GOOD[:, :63]), "INVALID_ARGUMENT", r"[-1, 64]"),
  ("wrong rank", lambda: _predict_request(GOOD[0]), "INVALID_ARGUMENT", r"[-1, 64]"),
  ("malformed tensor", lambda: _bad_tensor(_predict_request(GOOD)), "INVALID_ARGUMENT", ""),
]


def _renamed(name: str):
  request = _predict_request(GOOD)
  request.inputs[name].CopyFrom(request.inputs.pop("inputs"))
  return request


def _extra():
  request = _predict_request(GOOD)
  request.inputs["extra"].CopyFrom(request.inputs["inputs"])
  return request


BAD_GRPC += [
  ("missing input", lambda: _renamed("x"), "INVALID_ARGUMENT", "missing ['inputs']"),
  ("extra input", _extra, "INVALID_ARGUMENT", "unexpected ['extra']"),
]


@pytest.mark.parametrize(
  "make_request, code, message", [b[1:] for b in BAD_GRPC], ids=[b[0] for b in BAD_GRPC]
)
def test_grpc_bad_predict_gets_tf_serving_code(
  server, pixels, expected, make_request, code, message
):
  with pytest.raises(grpc.RpcError) as error:
    server.predict_stub.Predict(make_request(), timeout=30)
  assert error.value.code().name == code, error.value.details()
  assert message in error.value.details()
  response = server.predict_stub.Predict(_predict_request(pixels[:4]), timeout=30)  # Unharmed.
  _check_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()}, expected, slice(4))


def test_grpc_other_bad_requests(server):
  def code_of(call, request):
    with pytest.raises(grpc.RpcError) as error:
      call(request, timeout=30)
    return error.value.code()

  metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
  metadata.model_spec.name = "digits"
  assert code_of(server.predict_stub.GetModelMetadata, metadata) == grpc.StatusCode.INVALID_ARGUMENT
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = "nope"
  assert code_of(server.model_stub.GetModelStatus, status) == grpc.StatusCode.NOT_FOUND
  status.model_spec.name = "digits"
  status.model_spec.version.value = 5
  assert code_of(server.model_stub.GetModelStatus, status) == grpc.StatusCode.NOT_FOUND
  multi_inference = inference_pb2.MultiInferenceRequest()
  assert code_of(server.predict_stub.MultiInference, multi_inference) == (
    grpc.StatusCode.UNIMPLEMENTED
  )
  too_big = _predict_request(np.zeros((MAX_REQUEST_BYTES // 256 + 8, 64), np.float32))
  assert code_of(server.predict_stub.Predict, too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED


ROW = [1.0] * 64
BAD_REST = [
  ("GET", "/v1/models/nope", None, 404, "nope"),
  ("GET", "/v1/models/digits/versions/99", None, 404, "99"),
  ("GET", "/v1/models/digits/labels/canary", None, 400, "canary"),
  ("GET", "/v1/models/digits/versions/99/metadata", None, 404, "99"),
  ("GET", "/v1/models/digits:predict", None, 400, "Malformed request"),
  ("GET", "/v2/anything", None, 404, "Malformed request"),
  ("POST", "/v1/models/nope:predict", {"instances": [ROW]}, 404, "nope"),
  ("POST", "/v1/models/digits:predict", b"{not json", 400, "not JSON"),
  ("POST", "/v1/models/digits:predict", {"instances": [[1.0, 2.0]]}, 400, "[-1, 64]"),
  ("POST", "/v1/models/digits:predict", {"instances": [ROW, ROW[:3]]}, 400, "rectangular"),
  ("POST", "/v1/models/digits:predict", {"instances": [["a"] * 64]}, 400, "expects float32"),
  ("POST", "/v1/models/digits:predict", {"inputs": {"x": [ROW]}}, 400, "missing ['inputs']"),
  ("POST", "/v1/models/digits:predict", {"instances": [ROW], "inputs": [ROW]}, 400, "exactly one"),
  ("POST", "/v1/models/digits:predict", {"instances": [{"b64": "!!"}]}, 400, "base64"),
  (
    "POST",
    "/v1/models/digits:predict",
    {"signature_name": "generate", "instances": [ROW]},
    400,
    "generate",
  ),
]


@pytest.mark.parametrize("method, path, body, http_status, message", BAD_REST)
def test_rest_bad_requests(server, method, path, body, http_status, message):
  if isinstance(body, dict):
    body = json.dumps(body).encode()
  status, result = server.request(method, path, body)
  assert status == http_status, result
  assert message in result["error"]
  status, result = server.request(
    "POST", "/v1/models/digits:predict", json.dumps({"instances": [ROW]}).encode()
  )
  assert status == 200 and len(result["predictions"]) == 1


def _raw_http(server, head: bytes) -> bytes:
  with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as conn:
    conn.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
    return conn.makefile("rb").read()  # The server answers and closes: no body was sent.


@pytest.mark.parametrize(
  "head, answer",
  [
    (f"Content-Length: {MAX_REQUEST_BYTES + 1}\r\n".encode(), b"HTTP/1.1 413"),
    (b"Content-Length: -5\r\n", b"HTTP/1.1 400"),
    (b"Transfer-Encoding: chunked\r\n", b"HTTP/1.1 400"),
  ],
)
def test_rest_rejects_bodies_it_cannot_or_should_not_read(server, head, answer):
  response = _raw_http(server, head)
  assert response.startswith(answer), response[:200]
  assert b"max_request_size_bytes" in response or b"Content-Length" in response


@pytest.mark.parametrize("name", ["../digits", "/etc", "", ".hidden", "a/b", "x" * 129])
def test_model_names_that_could_leave_the_base_path_are_rejected(name, tmp_path):
  with pytest.raises(ValueError, match="is not a valid model name"):
    model_config.ModelConfig(name, str(tmp_path))


def test_rest_dtype_checks():
  float_spec = model_manager.TensorSpec(dtype=tf.float32.as_datatype_enum, shape=(-1,))
  int_spec = model_manager.TensorSpec(dtype=tf.int32.as_datatype_enum, shape=(-1,))
  assert rest._to_array("x", [1, 2], float_spec).dtype == np.float32
  for value, spec in (([1.5], int_spec), ([True], float_spec), (["a"], float_spec)):
    with pytest.raises(model_manager.ServingError, match="but the signature expects") as error:
      rest._to_array("x", value, spec)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_b64_values_become_bytes():
  spec = model_manager.TensorSpec(dtype=tf.string.as_datatype_enum, shape=(-1,))
  array = rest._to_array("text", [{"b64": "aGk="}, {"b64": "eW8="}], spec)
  assert array.tolist() == [b"hi", b"yo"]
  assert rest._to_json("out_bytes", np.array([b"hi"], object)) == [{"b64": "aGk="}]


def test_prometheus_metrics(server):
  server.get("/v1/models/nope")
  request = urllib.request.Request(server.url + "/monitoring/prometheus/metrics")
  with urllib.request.urlopen(request, timeout=30) as response:
    text = response.read().decode()
  assert (
    'serving_requests_total{api="grpc",code="OK",method="Predict",model="digits",version="1"}'
    in text
  )
  # Unknown names from requests are not labels.
  assert 'api="rest",code="NOT_FOUND",method="GetModelStatus",model="unknown",version=""' in text
  assert "serving_request_latency_seconds_bucket" in text


def test_client_cli(server, pixels, expected, tmp_path):
  inputs = tmp_path / "batch.json"
  inputs.write_text(json.dumps({"inputs": pixels[:3].tolist()}))

  def client(*args, server_address=f"127.0.0.1:{server.grpc_port}"):
    return subprocess.run(
      [
        sys.executable,
        "-m",
        "serving.client",
        f"--server={server_address}",
        "--model=digits",
        *args,
      ],
      cwd=model_server.REPO,
      env=model_server.SERVER_ENV,
      capture_output=True,
      text=True,
      timeout=120,
    )

  result = client(f"--input={inputs}", "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  answer = json.loads(result.stdout)
  _check_outputs(answer["outputs"], expected, slice(3))
  unreachable = client(
    "--status", "--timeout_seconds=3", server_address=f"127.0.0.1:{model_server.free_port()}"
  )
  assert unreachable.returncode == 1
  assert "error: cannot reach a model server" in unreachable.stderr


def _status(server) -> dict[int, tuple[str, str]]:
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = "digits"
  states = get_model_status_pb2.ModelVersionStatus.State
  response = server.model_stub.GetModelStatus(request, timeout=30)
  return {
    s.version: (states.Name(s.state), s.status.error_message) for s in response.model_version_status
  }


def _wait_for(predicate, timeout_s: float, what: str):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if value := predicate():
      return value
    time.sleep(0.05)
  raise TimeoutError(f"{what} within {timeout_s} s")


def test_new_version_is_swapped_in_under_load_without_a_failure(server, pixels, expected):
  """Version 2 dropped in while a client loops is served within the poll interval (plus its
  load and warmup); then version 1 is unloaded. Not one request fails."""
  versions_seen, failures, stop = [], [], threading.Event()

  def client_loop():
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
      try:
        response = server.predict_stub.Predict(_predict_request(pixels[:4]), timeout=30)
        versions_seen.append((time.monotonic(), response.model_spec.version.value))
        _check_outputs(
          {k: tf.make_ndarray(v) for k, v in response.outputs.items()}, expected, slice(4)
        )
      except Exception as e:
        failures.append(repr(e))

  thread = threading.Thread(target=client_loop)
  thread.start()
  try:
    _wait_for(lambda: len(versions_seen) >= 5, 30, "requests before the swap")
    staging = os.path.join(os.path.dirname(server.base), "staging-2")
    shutil.copytree(os.path.join(server.base, "1"), staging)
    dropped = time.monotonic()
    os.rename(staging, os.path.join(server.base, "2"))  # Atomic, as export does it.
    _wait_for(lambda: any(v == 2 for _, v in versions_seen), 30, "version 2 served")
    first_v2 = min(t for t, v in versions_seen if v == 2)
    count_at_swap = len(versions_seen)
    _wait_for(lambda: len(versions_seen) >= count_at_swap + 5, 30, "requests after the swap")
  finally:
    stop.set()
    thread.join(timeout=60)
  assert failures == []
  assert first_v2 - dropped < POLL_SECONDS + 10  # Poll interval plus load and warmup.
  assert all(v == 2 for t, v in versions_seen if t > first_v2 + 0.5)
  assert _wait_for(lambda: _status(server).get(1, ("",))[0] == "END", 10, "version 1 unloaded")
  assert _status(server) == {1: ("END", ""), 2: ("AVAILABLE", "")}


def test_a_broken_version_is_reported_never_served_and_retried(server, pixels):
  """A version whose load fails (here: its files are still being copied) is reported and not
  served; the previous one keeps serving. Once the copy completes, a retry loads it."""
  served = server.predict_stub.Predict(_predict_request(pixels[:2]), timeout=30)
  previous = served.model_spec.version.value
  broken = os.path.join(server.base, "3")
  os.makedirs(broken + ".tmp")
  with open(os.path.join(broken + ".tmp", "saved_model.pb"), "wb") as f:
    f.write(b"not a SavedModel")
  os.rename(broken + ".tmp", broken)
  try:
    _, error = _wait_for(
      lambda: _status(server).get(3, ("", ""))[0] == "END" and _status(server)[3], 20, "v3 failed"
    )
    assert error  # The load error, e.g. "OSError: ... saved_model.pb".

    def failed_over_rest():  # Polled: a retry may be under way.
      status = server.get("/v1/models/digits/versions/3")[1]["model_version_status"][0]
      return status if status["state"] == "END" else None

    rest_status = _wait_for(failed_over_rest, 10, "v3 reported over REST")
    assert rest_status["status"]["error_code"] == "UNKNOWN"
    latest = server.predict_stub.Predict(_predict_request(pixels[:2]), timeout=30)
    assert latest.model_spec.version.value == previous  # The previous version keeps serving.
    with pytest.raises(grpc.RpcError) as error_3:
      server.predict_stub.Predict(_predict_request(pixels[:2], version=3), timeout=30)
    assert error_3.value.code() == grpc.StatusCode.NOT_FOUND

    shutil.copytree(os.path.join(server.base, str(previous)), broken, dirs_exist_ok=True)
    _wait_for(lambda: _status(server).get(3, ("",))[0] == "AVAILABLE", 30, "v3 loaded on retry")
    latest = server.predict_stub.Predict(_predict_request(pixels[:2]), timeout=30)
    assert latest.model_spec.version.value == 3
  finally:
    shutil.rmtree(broken)
  _wait_for(lambda: 3 not in _status(server), 10, "removed version forgotten")
  _wait_for(
    lambda: _status(server).get(previous, ("",))[0] == "AVAILABLE", 30, "previous served again"
  )


def test_load_8_clients_3_seconds_without_errors(server, pixels):
  def client(deadline):
    latencies, errors = [], []
    while time.monotonic() < deadline and len(latencies) < 100_000:
      start = time.perf_counter()
      try:
        server.predict_stub.Predict(_predict_request(pixels[:8]), timeout=30)
        latencies.append(time.perf_counter() - start)
      except grpc.RpcError as e:
        errors.append(e.code())
    return latencies, errors

  deadline = time.monotonic() + 3
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(client, [deadline] * 8))
  latencies = np.array([t for r in results for t in r[0]])
  errors = [e for r in results for e in r[1]]
  assert errors == []
  assert len(latencies) > 50
  print(
    f"8 clients, 3 s: {len(latencies)} requests, p50 {np.percentile(latencies, 50) * 1e3:.2f} ms, "
    f"p99 {np.percentile(latencies, 99) * 1e3:.2f} ms"
  )


def _listening_addresses(port: int) -> set[str]:
  """Local addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
  addresses = set()
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
      for line in f.readlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN.
          addresses.add(address)
  return addresses


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket table")
def test_both_apis_listen_on_loopback_only_by_default(server):
  # 127.0.0.1, as IPv4 or IPv4-mapped IPv6 (gRPC's choice); never 0.0.0.0 or [::].
  loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
  for port in (server.grpc_port, server.rest_port):
    addresses = _listening_addresses(port)
    assert addresses and addresses <= loopback, (port, addresses)


def test_grpc_health_service(server):
  from grpc_health.v1 import health_pb2, health_pb2_grpc

  stub = health_pb2_grpc.HealthStub(server.channel)
  for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING, service
  with pytest.raises(grpc.RpcError) as error:
    stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
  assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_tensor_proto_whose_content_does_not_match_its_shape_is_rejected(server):
  request = _predict_request(np.zeros((2, 64), np.float32))
  request.inputs["inputs"].tensor_shape.dim[0].size = 3
  with pytest.raises(grpc.RpcError) as error:
    server.predict_stub.Predict(request, timeout=30)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert "not a valid TensorProto" in error.value.details()


def test_sigterm_finishes_the_request_in_flight_and_exits_0(server):
  """Stops the module's digits server (the tests after it use only its files)."""
  body = json.dumps({"instances": [ROW] * 4}).encode()
  with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as conn:
    conn.sendall(
      b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      + f"Content-Length: {len(body)}\r\n\r\n".encode()
      + body[:10]
    )
    time.sleep(0.3)  # The handler is now reading the body.
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    conn.sendall(body[10:])
    response = b""
    while b"predictions" not in response and len(response) < 100_000:
      chunk = conn.recv(65536)
      if not chunk:
        break
      response += chunk
  assert response.startswith(b"HTTP/1.1 200"), response[:200]
  assert server.proc.wait(timeout=60) == 0, server.log_tail()
  with pytest.raises(OSError):
    socket.create_connection(("127.0.0.1", server.rest_port), timeout=5).close()


@pytest.fixture(scope="module")
def lm_server(server, tmp_path_factory):
  """A server of two models from a --model_config_file: a language model (int32 tokens;
  signatures serving_default and generate) and digits with versions 1 and 2 both served."""
  root = tmp_path_factory.mktemp("lm")
  for version in ("1", "2"):
    shutil.copytree(os.path.join(server.base, "1"), root / "digits" / version)
  config = lm_config.get_config("smoke")
  config.data.worker_threads = 0
  config.data.max_bytes = 60_000
  config.data.eval_every_documents = 4
  config.train.num_steps = 4
  train.train_and_evaluate(config, str(root / "run"), jax.devices()[:1])
  export.export(str(root / "run"), str(root / "models"), max_new_tokens=5)
  (root / "models.config").write_text(
    f"""model_config_list {{
      config {{ name: "lm" base_path: "{root / "models"}" model_platform: "tensorflow" }}
      config {{
        name: "digits"
        base_path: "{root / "digits"}"
        model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
        version_labels {{ key: "stable" value: 1 }}
        version_labels {{ key: "canary" value: 2 }}
      }}
    }}"""
  )
  with Server(
    str(root / "models"),
    str(root / "server.log"),
    model_name="lm",
    models_args=[f"--model_config_file={root / 'models.config'}"],
  ) as server:
    yield server, loading.load(str(root / "run")), str(root / "models" / "1")


def test_language_model_signatures_over_grpc_and_rest(lm_server):
  server, model, path = lm_server
  prompt = np.array([list(b"def main():\n  ret"), list(b"import numpy as n")], np.int32)
  response = server.predict_stub.Predict(
    _predict_request(prompt, input_name="tokens", name="lm"), timeout=30
  )
  expected = jax.nn.log_softmax(model.model.apply(model.variables, prompt)[:, -1, :259])
  np.testing.assert_allclose(
    tf.make_ndarray(response.outputs["log_probs"]), expected, rtol=1e-5, atol=1e-5
  )

  generated = tf.saved_model.load(path).signatures["generate"](tokens=tf.constant(prompt))
  response = server.predict_stub.Predict(
    _predict_request(prompt, input_name="tokens", name="lm", signature_name="generate"), timeout=30
  )
  assert response.model_spec.signature_name == "generate"
  np.testing.assert_array_equal(
    tf.make_ndarray(response.outputs["tokens"]), generated["tokens"].numpy()
  )
  body = {"signature_name": "generate", "inputs": {"tokens": prompt.tolist()}}
  status, result = server.request("POST", "/v1/models/lm:predict", json.dumps(body).encode())
  assert status == 200, result
  assert result["outputs"] == generated["tokens"].numpy().tolist()

  body = {"signature_name": "generate", "instances": (prompt + 0.5).tolist()}
  status, result = server.request("POST", "/v1/models/lm:predict", json.dumps(body).encode())
  assert status == 400 and "expects int32" in result["error"]
  with pytest.raises(grpc.RpcError) as error:
    server.predict_stub.Predict(
      _predict_request(prompt.astype(np.float32), input_name="tokens", name="lm"), timeout=30
    )
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  status, metadata = server.get("/v1/models/lm/metadata")
  assert {"serving_default", "generate"} <= set(
    metadata["metadata"]["signature_def"]["signature_def"]
  )


def test_model_config_file_serves_several_models_and_versions(lm_server, pixels, expected):
  server = lm_server[0]
  versions = {}
  for spec in ({"version": 1}, {"version_label": "canary"}, {}):
    response = server.predict_stub.Predict(_predict_request(pixels[:3], **spec), timeout=30)
    _check_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()}, expected, slice(3))
    versions[str(spec)] = response.model_spec.version.value
  assert list(versions.values()) == [1, 2, 2]
  status, result = server.get("/v1/models/digits")
  assert [(v["version"], v["state"]) for v in result["model_version_status"]] == [
    ("1", "AVAILABLE"),
    ("2", "AVAILABLE"),
  ]
  status, result = server.request(
    "POST",
    "/v1/models/digits/labels/stable:predict",
    json.dumps({"instances": pixels[:1].tolist()}).encode(),
  )
  assert status == 200 and len(result["predictions"]) == 1
  assert server.get("/v1/models/nope")[0] == 404


@pytest.mark.parametrize(
  "kind, num_versions, versions, on_disk, aspired",
  [
    ("latest", 1, (), {1, 2, 3}, {3}),
    ("latest", 2, (), {1, 2, 3}, {2, 3}),
    ("all", 1, (), {1, 5}, {1, 5}),
    ("specific", 1, (1, 4), {1, 2, 3}, {1}),
  ],
)
def test_version_policies(kind, num_versions, versions, on_disk, aspired):
  policy = model_manager.VersionPolicy(kind, num_versions=num_versions, versions=versions)
  assert policy.aspired(on_disk) == aspired


@pytest.mark.parametrize(
  "text, message",
  [
    ("model_config_list {}", "has no model_config_list"),
    ("model_config_list { config { name: 'a' } }", "model 'a': base_path is required"),
    ("model_config_list { config { name: '../a' base_path: '/x' } }", "not a valid model name"),
    (
      "model_config_list { config { name: 'a' base_path: '/x' model_platform: 'onnx' } }",
      "model_platform 'onnx' is not 'tensorflow'",
    ),
    ("model_config_list { config { nme: 'a' } }", "is not a text ModelServerConfig"),
  ],
)
def test_bad_model_config_files(text, message, tmp_path):

  (tmp_path / "models.config").write_text(text)
  with pytest.raises(ValueError, match=message):
    model_config.read(str(tmp_path / "models.config"))


def _digits_config(base: str, labels: dict[str, int]) -> str:
  return f"""model_config_list {{
    config {{
      name: "digits"
      base_path: "{base}"
      model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
      {" ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.items())}
    }}
  }}"""


@pytest.fixture(scope="module")
def batching_server(server, tmp_path_factory):
  """Digits versions 1 and 2 (labels stable=1, canary=2) from a --model_config_file read every
  second, with server-side batching (up to 32 rows; a batch waits at most 20 ms)."""
  root = tmp_path_factory.mktemp("batching")
  for version in ("1", "2"):
    shutil.copytree(os.path.join(server.base, "1"), root / "digits" / version)
  (root / "models.config").write_text(_digits_config(root / "digits", {"stable": 1, "canary": 2}))
  (root / "batching.config").write_text(
    "max_batch_size { value: 32 } batch_timeout_micros { value: 20000 } "
    "max_enqueued_batches { value: 1000 } num_batch_threads { value: 2 }"
  )
  with Server(
    str(root / "digits"),
    str(root / "server.log"),
    models_args=[
      f"--model_config_file={root / 'models.config'}",
      "--model_config_file_poll_wait_seconds=1",
      f"--batching_parameters_file={root / 'batching.config'}",
    ],
  ) as server:
    yield server, root


def _batches(server, version: int) -> tuple[float, float, float]:
  """(batches, rows, batches of one row) that server-side batching ran on digits `version`."""
  from prometheus_client.parser import text_string_to_metric_families

  with urllib.request.urlopen(server.url + "/monitoring/prometheus/metrics", timeout=30) as r:
    text = r.read().decode()
  values = {}
  for family in text_string_to_metric_families(text):
    for sample in family.samples if family.name == "serving_batch_size" else ():
      if sample.labels["version"] == str(version) and sample.labels.get("le", "1.0") == "1.0":
        values[sample.name] = sample.value
  return tuple(values.get(f"serving_batch_size_{kind}", 0.0) for kind in ("count", "sum", "bucket"))


def test_batching_merges_concurrent_requests_and_answers_as_unbatched(
  batching_server, pixels, expected
):
  server = batching_server[0]
  before = _batches(server, 2)
  requests = [(i % 40, i % 40 + 1 + i % 3) for i in range(48)]  # 1 to 3 rows each.

  def predict(rows):
    response = server.predict_stub.Predict(_predict_request(pixels[slice(*rows)]), timeout=30)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(predict, requests))
  for rows, outputs in zip(requests, answers, strict=True):
    _check_outputs(outputs, expected, slice(*rows))
  batches, rows, single_rows = (b - a for a, b in zip(before, _batches(server, 2), strict=True))
  assert rows == sum(b - a for a, b in requests)
  assert batches < len(requests)  # Merged: fewer runs than requests...
  assert batches > single_rows  # ...and some of them held more than one row.


def _label_version(server, label: str) -> int:
  request = _predict_request(np.zeros((1, 64), np.float32), version_label=label)
  return server.predict_stub.Predict(request, timeout=30).model_spec.version.value


def test_a_version_label_moves_in_a_reloaded_config(batching_server):
  from tensorflow_serving.apis import model_management_pb2
  from tensorflow_serving.config import model_server_config_pb2

  server, root = batching_server
  assert _label_version(server, "canary") == 2
  # The config file is polled: moving the label there takes effect within a few polls.
  (root / "models.config").write_text(_digits_config(root / "digits", {"stable": 1, "canary": 1}))
  _wait_for(lambda: _label_version(server, "canary") == 1, 15, "label moved by the config file")

  def reload(labels):
    from google.protobuf import text_format

    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(_digits_config(root / "digits", labels), request.config)
    return server.model_stub.HandleReloadConfigRequest(request, timeout=60)

  response = reload({"stable": 1, "canary": 2})  # HandleReloadConfigRequest takes effect at once.
  assert response.status.error_code == 0
  assert _label_version(server, "canary") == 2

  with pytest.raises(grpc.RpcError) as error:
    reload({"canary": 3})  # Version 3 is not available: nothing changes.
  assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
  assert "canary=3" in error.value.details()
  assert _label_version(server, "canary") == 2 and _label_version(server, "stable") == 1

  request = model_management_pb2.ReloadConfigRequest(
    config=model_server_config_pb2.ModelServerConfig()
  )
  with pytest.raises(grpc.RpcError) as error:
    server.model_stub.HandleReloadConfigRequest(request, timeout=60)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert _label_version(server, "canary") == 2
  # The file (canary=1) was applied once; a reload over RPC is not undone by the next poll.
  time.sleep(2.5)
  assert _label_version(server, "canary") == 2


@pytest.mark.parametrize(
  "value",
  [
    *(np.arange(6, dtype=d).reshape(2, 3) for d in (np.float32, np.float64, np.int8, np.int16)),
    *(np.arange(6, dtype=d).reshape(3, 2) for d in (np.int32, np.int64, np.uint8, np.uint16)),
    *(np.arange(4, dtype=d) for d in (np.uint32, np.uint64, np.float16)),
    np.zeros((0, 3), np.float32),
    np.float32(2.5).reshape(()),
    np.array([True, False]),
    np.array([b"a", b"\xff\x00"], dtype=object),
  ],
  ids=lambda v: f"{v.dtype}{list(v.shape)}",
)
def test_tensor_protos_round_trip_as_tensorflow_makes_them(value):
  from tensorflow.core.framework import tensor_pb2

  from serving.server import tensors

  proto = tensor_pb2.TensorProto()
  tensors.fill_tensor_proto(proto, value)
  for decoded in (tf.make_ndarray(proto), tensors.to_ndarray(proto)):
    assert decoded.dtype == value.dtype and decoded.shape == value.shape
    np.testing.assert_array_equal(decoded, value)
  decoded = tensors.to_ndarray(tf.make_tensor_proto(value))  # What clients send.
  assert decoded.dtype == value.dtype and decoded.shape == value.shape
  np.testing.assert_array_equal(decoded, value)


def test_a_label_naming_no_available_version_stops_the_server_at_start(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "serving.server",
      "--port=0",
      "--model_name=digits",
      f"--model_base_path={tmp_path}",
      "--version_labels=stable=1",
    ],
    cwd=model_server.REPO,
    env=model_server.SERVER_ENV,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert "version labels may only name available versions" in proc.stderr
  assert "model digits: stable=1" in proc.stderr
