"""The model server in a subprocess on 127.0.0.1: gRPC and REST Predict, metadata and status
equal JAX and TF Serving; TF Serving's status codes and messages for bad requests; metrics,
health, the listening addresses and the client CLI. One server for the module, never stopped
before its last test."""

import json
import os
import socket

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from tensorflow_serving.apis import (  # noqa: E402
  get_model_metadata_pb2,
  get_model_status_pb2,
  inference_pb2,
)

from tests.helpers import model_server  # noqa: E402
from tests.helpers.model_server import (  # noqa: E402
  MAX_REQUEST_BYTES,
  check_outputs,
  outputs_of,
  predict_request,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return model_server.digits_export(tmp_path_factory)


@pytest.fixture(scope="module")
def server(digits, tmp_path_factory):
  base = str(tmp_path_factory.mktemp("models") / "digits")
  model_server.copy_version(digits[1], base)
  monitoring = tmp_path_factory.mktemp("config") / "monitoring.config"
  monitoring.write_text('prometheus_config { enable: true path: "/metrics" }')
  args = [
    *model_server.QUICK_ARGS,
    "--model_name=digits",
    f"--model_base_path={base}",
    "--version_labels=stable=1",
    f"--monitoring_config_file={monitoring}",  # TF Serving's; adds the path /metrics.
  ]
  log = str(tmp_path_factory.mktemp("logs") / "server.log")
  with model_server.Server(args, log, base=base) as server:
    yield server


@pytest.fixture(scope="module")
def pixels():
  return model_server.digits_pixels()


@pytest.fixture(scope="module")
def expected(digits, pixels):
  return model_server.jax_digits_outputs(digits[0], pixels)


def test_grpc_predict_matches_jax(server, pixels, expected):
  response = server.predict_stub.Predict(predict_request(pixels), timeout=30)
  assert response.model_spec.name == "digits"
  assert response.model_spec.version.value == 1
  assert response.model_spec.signature_name == "serving_default"
  check_outputs(outputs_of(response), expected)

  by_label = server.predict_stub.Predict(
    predict_request(pixels[:3], version_label="stable", output_filter=["classes"]), timeout=30
  )
  assert list(by_label.outputs) == ["classes"] and by_label.model_spec.version.value == 1
  np.testing.assert_array_equal(outputs_of(by_label)["classes"], expected["classes"][:3])


def test_rest_predict_row_and_columnar_match_jax(server, pixels, expected):
  status, rows = server.request(
    "POST", "/v1/models/digits:predict", {"instances": pixels[:5].tolist()}
  )
  assert status == 200, rows
  check_outputs(
    {k: [row[k] for row in rows["predictions"]] for k in ("probabilities", "classes")},
    expected,
    slice(5),
  )
  named_rows = [{"inputs": row} for row in pixels[:2].tolist()]
  status, result = server.request(
    "POST", "/v1/models/digits/versions/1:predict", {"instances": named_rows}
  )
  assert status == 200, result
  check_outputs(
    {k: [row[k] for row in result["predictions"]] for k in ("probabilities", "classes")},
    expected,
    slice(2),
  )
  body = {"signature_name": "serving_default", "inputs": pixels.tolist()}
  status, columns = server.request("POST", "/v1/models/digits/labels/stable:predict", body)
  assert status == 200, columns
  check_outputs(columns["outputs"], expected)


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
  rest_signatures = metadata["metadata"]["signature_def"]["signature_def"]
  assert set(rest_signatures) == set(signature_defs.signature_def)  # The same map, as JSON.
  assert rest_signatures["serving_default"]["inputs"]["inputs"]["dtype"] == "DT_FLOAT"

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


def _wrong_shape_tensor(request):
  request.inputs["inputs"].tensor_shape.dim[0].size = 3  # The content holds 2 rows.
  return request


def _renamed(name: str):
  request = predict_request(GOOD)
  request.inputs[name].CopyFrom(request.inputs.pop("inputs"))
  return request


def _extra():
  request = predict_request(GOOD)
  request.inputs["extra"].CopyFrom(request.inputs["inputs"])
  return request


GOOD = np.ones((2, 64), np.float32)
SHAPE = "expects [-1, 64] (-1: any size)"
BAD_GRPC = [
  ("unknown model", lambda: predict_request(GOOD, name="nope"), "NOT_FOUND", "request: 'nope'"),
  (
    "model as path",
    lambda: predict_request(GOOD, name="../digits"),
    "NOT_FOUND",
    "Servable not found for request: '../digits'",
  ),
  (
    "unknown version",
    lambda: predict_request(GOOD, version=99),
    "NOT_FOUND",
    "Specific(digits, 99); available: [1]",
  ),
  (
    "unknown label",
    lambda: predict_request(GOOD, version_label="canary"),
    "INVALID_ARGUMENT",
    "Unrecognized servable version label: canary; model digits has labels ['stable']",
  ),
  (
    "unknown signature",
    lambda: predict_request(GOOD, signature_name="generate"),
    "FAILED_PRECONDITION",
    'Serving signature name: "generate" not found',
  ),
  (
    "unknown output",
    lambda: predict_request(GOOD, output_filter=["logits"]),
    "INVALID_ARGUMENT",
    "output tensor alias not found in signature: logits",
  ),
  (
    "wrong dtype",
    lambda: predict_request(GOOD.astype(np.int32)),
    "INVALID_ARGUMENT",
    "input 'inputs' has dtype int32 but signature serving_default expects float32",
  ),
  ("wrong shape", lambda: predict_request(GOOD[:, :63]), "INVALID_ARGUMENT", SHAPE),
  ("wrong rank", lambda: predict_request(GOOD[0]), "INVALID_ARGUMENT", "shape [64] but"),
  (
    "malformed tensor",
    lambda: _bad_tensor(predict_request(GOOD)),
    "INVALID_ARGUMENT",
    "input 'inputs' is not a valid TensorProto",
  ),
  (
    "content shorter than its shape",
    lambda: _wrong_shape_tensor(predict_request(GOOD)),
    "INVALID_ARGUMENT",
    "tensor_content holds 512 bytes; shape [3, 64] of float32 needs 768",
  ),
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
  response = server.predict_stub.Predict(predict_request(pixels[:4]), timeout=30)  # Unharmed.
  check_outputs(outputs_of(response), expected, slice(4))


def _code_of(call, request):
  with pytest.raises(grpc.RpcError) as error:
    call(request, timeout=30)
  return error.value.code(), error.value.details()


def test_grpc_other_bad_requests(server):
  metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
  metadata.model_spec.name = "digits"
  assert _code_of(server.predict_stub.GetModelMetadata, metadata) == (
    grpc.StatusCode.INVALID_ARGUMENT,
    "Metadata field nope is not supported; request metadata_field 'signature_def'",
  )
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = "nope"
  assert _code_of(server.model_stub.GetModelStatus, status) == (
    grpc.StatusCode.NOT_FOUND,
    "Could not find any versions of model nope",
  )
  status.model_spec.name = "digits"
  status.model_spec.version.value = 5
  assert _code_of(server.model_stub.GetModelStatus, status) == (
    grpc.StatusCode.NOT_FOUND,
    "Could not find version 5 of model digits",
  )
  multi_inference = (
    inference_pb2.MultiInferenceRequest()
  )  # No task (tests/test_multi_inference.py).
  code, _ = _code_of(server.predict_stub.MultiInference, multi_inference)
  assert code == grpc.StatusCode.INVALID_ARGUMENT
  too_big = predict_request(np.zeros((MAX_REQUEST_BYTES // 256 + 8, 64), np.float32))
  code, _ = _code_of(server.predict_stub.Predict, too_big)
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


ROW = [1.0] * 64
PREDICT = "/v1/models/digits:predict"
BAD_REST = [
  ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
  ("GET", "/v1/models/digits/versions/99", None, 404, "Could not find version 99 of model"),
  ("GET", "/v1/models/digits/labels/canary", None, 400, "version label: canary"),
  ("GET", "/v1/models/digits/versions/99/metadata", None, 404, "Specific(digits, 99)"),
  ("GET", PREDICT, None, 400, "Malformed request: GET /v1/models/digits:predict"),
  ("GET", "/v2/anything", None, 404, "Malformed request: GET /v2/anything"),
  ("POST", "/v1/models/nope:predict", {"instances": [ROW]}, 404, "request: 'nope'"),
  ("POST", PREDICT, b"{not json", 400, "request body is not JSON"),
  ("POST", PREDICT, {"instances": [[1.0, 2.0]]}, 400, "shape [1, 2] but signature"),
  ("POST", PREDICT, {"instances": [ROW, ROW[:3]]}, 400, "is not a rectangular array"),
  ("POST", PREDICT, {"instances": [["a"] * 64]}, 400, "the signature expects float32"),
  ("POST", PREDICT, {"inputs": {"x": [ROW]}}, 400, "missing ['inputs']; unexpected ['x']"),
  ("POST", PREDICT, {"instances": [ROW], "inputs": [ROW]}, 400, 'exactly one of "instances"'),
  ("POST", PREDICT, {"instances": [{"b64": "!!"}]}, 400, "invalid base64"),
  (
    "POST",
    PREDICT,
    {"signature_name": "generate", "instances": [ROW]},
    400,
    'signature name: "generate" not found',
  ),
]


@pytest.mark.parametrize("method, path, body, http_status, message", BAD_REST)
def test_rest_bad_requests(server, method, path, body, http_status, message):
  status, result = server.request(method, path, body)
  assert status == http_status, result
  assert message in result["error"]
  status, result = server.request("POST", PREDICT, {"instances": [ROW]})
  assert status == 200 and len(result["predictions"]) == 1


def _raw_http(server, head: bytes) -> bytes:
  with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as conn:
    conn.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
    return conn.makefile("rb").read()  # The server answers and closes: no body was sent.


@pytest.mark.parametrize(
  "head, answer, message",
  [
    (
      f"Content-Length: {MAX_REQUEST_BYTES + 1}\r\n".encode(),
      b"HTTP/1.1 413",
      f"exceeds --max_request_size_bytes={MAX_REQUEST_BYTES}".encode(),
    ),
    (b"Content-Length: -5\r\n", b"HTTP/1.1 400", b"send the body with a Content-Length (got '-5'"),
    (b"Transfer-Encoding: chunked\r\n", b"HTTP/1.1 400", b"chunked bodies are not supported"),
  ],
)
def test_rest_rejects_bodies_it_cannot_or_should_not_read(server, head, answer, message):
  response = _raw_http(server, head)
  assert response.startswith(answer), response[:200]
  assert b"Connection: close" in response or response.endswith(b"}")
  assert message in response.split(b"\r\n\r\n", 1)[1]  # In the JSON body, not a header.


def test_prometheus_metrics(server):
  server.get("/v1/models/nope")
  server.predict_stub.Predict(predict_request(GOOD), timeout=30)
  text = server.metrics_text()
  assert (
    'serving_requests_total{api="grpc",code="OK",method="Predict",model="digits",version="1"}'
    in text
  )
  # Unknown names from requests are not labels.
  assert 'api="rest",code="NOT_FOUND",method="GetModelStatus",model="unknown",version=""' in text
  assert 'serving_request_latency_seconds_bucket{api="grpc",le="0.0005",method="Predict"' in text
  at_config_path = server.metrics_text("/metrics")  # --monitoring_config_file's path.
  assert (
    'serving_requests_total{api="grpc",code="OK",method="Predict",model="digits"' in at_config_path
  )


def test_client_cli(server, pixels, expected, tmp_path):
  inputs = tmp_path / "batch.json"
  inputs.write_text(json.dumps({"inputs": pixels[:3].tolist()}))

  def client(*args, server_address=f"127.0.0.1:{server.grpc_port}"):
    return model_server.run_module(
      "serving.client", f"--server={server_address}", "--model=digits", *args
    )

  result = client(f"--input={inputs}", "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  answer = json.loads(result.stdout)
  check_outputs(answer["outputs"], expected, slice(3))
  unreachable = client(
    "--status", "--timeout_seconds=3", server_address=f"127.0.0.1:{model_server.free_port()}"
  )
  assert unreachable.returncode == 1
  assert "error: cannot reach a model server" in unreachable.stderr


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
