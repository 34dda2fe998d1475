"""TF Serving's REST, warmup and gRPC flags, and request deadlines: --rest_api_timeout_in_ms (a
REST request past it answers 504 without its model running; a gRPC request keeps its client's
deadline the same way), --rest_api_num_threads (requests processed at once, the others wait for
a slot), --rest_api_enable_cors_support, --enable_model_warmup,
--num_request_iterations_for_warmup and --grpc_channel_arguments.
The scheduler's part of the deadline is in test_batching.py."""

import http.client
import os
import threading
import time
import types

import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from serving.server import rest_api  # noqa: E402
from serving.server.errors import ServingError  # noqa: E402
from tests.helpers import model_server  # noqa: E402
from tests.helpers.model_server import predict_request  # noqa: E402

# A batch waits this long for more rows: far past the REST deadline below.
BATCH_TIMEOUT_S = 3.0
REST_TIMEOUT_MS = 400
# --grpc_channel_arguments lowers the largest gRPC message from --max_request_size_bytes.
GRPC_MAX_MESSAGE = 4096


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return model_server.digits_export(tmp_path_factory)


@pytest.fixture(scope="module")
def slow_batches_server(digits, tmp_path_factory):
  """Digits with batches that wait BATCH_TIMEOUT_S for rows, a REST deadline of
  REST_TIMEOUT_MS, one REST thread, and warmup off."""
  root = tmp_path_factory.mktemp("deadlines")
  model_server.copy_version(digits[1], str(root / "digits"))
  (root / "batching.config").write_text(
    f"max_batch_size {{ value: 32 }} batch_timeout_micros {{ value: {int(BATCH_TIMEOUT_S * 1e6)} }}"
  )
  args = [
    *model_server.QUICK_ARGS,
    f"--model_base_path={root / 'digits'}",
    "--model_name=digits",
    f"--batching_parameters_file={root / 'batching.config'}",
    f"--rest_api_timeout_in_ms={REST_TIMEOUT_MS}",
    "--rest_api_num_threads=1",
    "--enable_model_warmup=false",
    f"--grpc_channel_arguments=grpc.max_receive_message_length={GRPC_MAX_MESSAGE}",
    "--rest_api_enable_cors_support",
  ]
  with model_server.Server(args, str(root / "server.log")) as server:
    yield server


def _requests_by_code(server) -> dict[tuple[str, str], float]:
  from prometheus_client.parser import text_string_to_metric_families

  counts = {}
  for family in text_string_to_metric_families(server.metrics_text()):
    for sample in family.samples if family.name == "serving_requests" else ():
      if sample.labels["method"] == "Predict":
        key = (sample.labels["api"], sample.labels["code"])
        counts[key] = counts.get(key, 0) + sample.value
  return counts


def _batches_run(server) -> float:
  from prometheus_client.parser import text_string_to_metric_families

  for family in text_string_to_metric_families(server.metrics_text()):
    for sample in family.samples:
      if sample.name == "serving_batch_size_count":
        return sample.value
  return 0.0


def test_requests_past_their_deadline_are_answered_then_and_never_run(slow_batches_server):
  server = slow_batches_server
  assert "warmup disabled" in server.log_text()
  pixels = model_server.digits_pixels(1)
  start = time.monotonic()
  status, body = server.request("POST", "/v1/models/digits:predict", {"instances": pixels.tolist()})
  answered_after = time.monotonic() - start
  assert status == 504, body
  assert "deadline passed before its batch ran" in body["error"]
  assert answered_after < BATCH_TIMEOUT_S - 1.0  # At its deadline, not when its batch ran.
  with pytest.raises(grpc.RpcError) as error:
    server.predict_stub.Predict(predict_request(pixels), timeout=0.5)
  assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
  # A patient client is answered once its batch runs; the expired rows were left out of it.
  response = server.predict_stub.Predict(predict_request(pixels), timeout=30)
  assert response.model_spec.version.value == 1
  model_server.wait_for(
    lambda: _requests_by_code(server).get(("grpc", "DEADLINE_EXCEEDED")) == 1,
    30,
    "the server counted the gRPC request past its deadline",
  )
  assert _requests_by_code(server) == {
    ("rest", "DEADLINE_EXCEEDED"): 1,
    ("grpc", "DEADLINE_EXCEEDED"): 1,
    ("grpc", "OK"): 1,
  }
  assert _batches_run(server) == 1


def test_grpc_channel_arguments_override_the_server_options(slow_batches_server):
  request = predict_request(model_server.digits_pixels(50))  # 50 x 64 floats: 12.8 KB.
  assert request.ByteSize() > GRPC_MAX_MESSAGE
  with pytest.raises(grpc.RpcError) as error:
    slow_batches_server.predict_stub.Predict(request, timeout=30)
  assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _http(port: int, method: str, path: str, headers=None):
  """(status, headers) of one HTTP request to 127.0.0.1:`port`."""
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  try:
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    response.read()
    return response.status, response.headers
  finally:
    connection.close()


def test_cors_headers_and_preflight(slow_batches_server):
  status, headers = _http(
    slow_batches_server.rest_port,
    "OPTIONS",
    "/v1/models/digits:predict",
    {
      "Origin": "http://app.example",
      "Access-Control-Request-Method": "POST",
      "Access-Control-Request-Headers": "content-type, x-user-id",
    },
  )
  assert status == 204
  assert headers["Access-Control-Allow-Origin"] == "*"
  assert "POST" in headers["Access-Control-Allow-Methods"]
  assert headers["Access-Control-Allow-Headers"] == "content-type, x-user-id"
  status, headers = _http(slow_batches_server.rest_port, "GET", "/v1/models/digits")
  assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
  assert "x-request-id" in headers["Access-Control-Expose-Headers"]


def test_without_cors_support_a_preflight_is_unsupported():
  httpd = rest_api.build(
    types.SimpleNamespace(metrics=None), "127.0.0.1", 0, max_request_size_bytes=1 << 20
  )
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  try:
    status, headers = _http(httpd.server_address[1], "OPTIONS", "/v1/models/digits:predict")
  finally:
    httpd.shutdown()
    httpd.server_close()
  assert status == 501 and "Access-Control-Allow-Origin" not in headers


def test_a_rest_request_waits_for_a_processing_slot_until_its_deadline():
  httpd = rest_api.build(
    types.SimpleNamespace(metrics=None),
    "127.0.0.1",
    0,
    max_request_size_bytes=1 << 20,
    num_threads=1,
    timeout_seconds=1.0,
  )
  try:
    with httpd.processing_slot(time.monotonic() + 5):
      with (
        pytest.raises(ServingError, match="--rest_api_num_threads") as error,
        httpd.processing_slot(time.monotonic() + 0.1),
      ):
        pass
      assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with httpd.processing_slot(time.monotonic() + 0.1):  # Given back: free again.
      pass
  finally:
    httpd.server_close()


def test_each_warmup_record_replays_the_configured_number_of_times(digits, monkeypatch):
  from serving.server import loaded_version, model_config, model_versions

  runs = []

  class Recording(loaded_version.LoadedVersion):
    def _execute(self, signature_name, inputs):
      runs.append(signature_name)
      return super()._execute(signature_name, inputs)

  monkeypatch.setattr(model_versions, "LoadedVersion", Recording)
  base = os.path.dirname(digits[1])
  for warmup, expected_runs in (
    (model_versions.Warmup(iterations=3), 6),
    (model_versions.Warmup(False), 0),
  ):
    runs.clear()
    model = model_versions.ModelVersions(model_config.ModelConfig("digits", base), warmup=warmup)
    model.poll()
    assert model.resolve("digits").version == 1
    assert len(runs) == expected_runs, (warmup, runs)  # Two records (one per signature).
    model.unload_all(reason="test over")


@pytest.mark.parametrize(
  "flag",
  [
    "--rest_api_num_threads=0",
    "--rest_api_timeout_in_ms=0",
    "--num_request_iterations_for_warmup=0",
  ],
)
def test_non_positive_rest_and_warmup_flags_are_one_error_line(flag, tmp_path):
  proc = model_server.run_module(
    "serving.server", "--port=0", f"--model_base_path={tmp_path}", flag
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: {flag} must be at least 1"], proc.stderr


def test_a_malformed_grpc_channel_argument_is_one_error_line(tmp_path):
  proc = model_server.run_module(
    "serving.server",
    "--port=0",
    f"--model_base_path={tmp_path}",
    "--grpc_channel_arguments=grpc.max_connection_age_ms=1000,grpc.keepalive_time_ms",
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr
  assert "entry 'grpc.keepalive_time_ms' is not key=value" in errors[0]
