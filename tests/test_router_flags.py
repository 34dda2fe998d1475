"""The router takes the model server's port flags (serving/server/front_flags.py), and its REST
API answers a backend's status with TF Serving's HTTP code. The backend here is a stub gRPC
server whose GetModelStatus fails with the status its model is named after."""

import time
import urllib.request
from concurrent import futures

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the router needs grpcio (make install)")

from tensorflow_serving.apis import (  # noqa: E402
  get_model_status_pb2,
  model_service_pb2_grpc,
)

from serving.server import rest_api  # noqa: E402
from tests.helpers import model_server  # noqa: E402

# TF Serving's REST code for each status (tensorflow_serving/model_servers/http_server.cc).
TF_SERVING_HTTP_CODES = {
  "OK": 200,
  "CANCELLED": 499,
  "UNKNOWN": 500,
  "INVALID_ARGUMENT": 400,
  "DEADLINE_EXCEEDED": 504,
  "NOT_FOUND": 404,
  "ALREADY_EXISTS": 409,
  "PERMISSION_DENIED": 403,
  "RESOURCE_EXHAUSTED": 429,
  "FAILED_PRECONDITION": 400,
  "ABORTED": 409,
  "OUT_OF_RANGE": 400,
  "UNIMPLEMENTED": 501,
  "INTERNAL": 500,
  "UNAVAILABLE": 503,
  "DATA_LOSS": 500,
  "UNAUTHENTICATED": 401,
}
# Largest gRPC message the router accepts, set through --grpc_channel_arguments.
MAX_MESSAGE = 4096
REST_TIMEOUT_MS = 700
BACKEND_SLEEP_S = 5.0


class _StubModelService(model_service_pb2_grpc.ModelServiceServicer):
  """GetModelStatus of model "ok" answers AVAILABLE; of "slow", the same after BACKEND_SLEEP_S;
  of a status code's name in lower case, fails with that status."""

  def GetModelStatus(self, request, context):
    name = request.model_spec.name
    if name == "slow":
      time.sleep(BACKEND_SLEEP_S)
    if name in ("ok", "slow"):
      response = get_model_status_pb2.GetModelStatusResponse()
      status = response.model_version_status.add(version=1)
      status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
      return response
    context.abort(grpc.StatusCode[name.upper()], f"the stub fails {name}")


@pytest.fixture(scope="module")
def router(tmp_path_factory):
  root = tmp_path_factory.mktemp("router_flags")
  backend = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
  model_service_pb2_grpc.add_ModelServiceServicer_to_server(_StubModelService(), backend)
  backend_port = backend.add_insecure_port("127.0.0.1:0")
  backend.start()
  monitoring = root / "monitoring.config"
  monitoring.write_text('prometheus_config { enable: true path: "/metrics" }')
  server = model_server.Server(
    [
      f"--backend=127.0.0.1:{backend_port}",
      "--rest_api_enable_cors_support",
      f"--rest_api_timeout_in_ms={REST_TIMEOUT_MS}",
      "--rest_api_num_threads=2",
      f"--grpc_channel_arguments=grpc.max_receive_message_length={MAX_MESSAGE}",
      f"--monitoring_config_file={monitoring}",
    ],
    str(root / "router.log"),
    model_name="ok",
    module="serving.router",
  )
  try:
    with server:
      yield server
  finally:
    backend.stop(grace=None)
  assert "Traceback" not in server.log_text()


def test_the_rest_code_of_every_status_is_tf_servings():
  assert {code.name: rest_api.http_status(code) for code in grpc.StatusCode} == (
    TF_SERVING_HTTP_CODES
  )


@pytest.mark.parametrize(
  "status", ["resource_exhausted", "unimplemented", "permission_denied", "unauthenticated"]
)
def test_a_backend_status_reaches_rest_clients_as_tf_serving_answers_it(router, status):
  code, body = router.get(f"/v1/models/{status}")
  assert code == TF_SERVING_HTTP_CODES[status.upper()]
  assert f"the stub fails {status}" in body["error"]


def test_rest_api_timeout_bounds_the_forwarded_call(router):
  start = time.monotonic()
  code, body = router.get("/v1/models/slow")
  elapsed = time.monotonic() - start
  assert code == 504, body
  assert elapsed < BACKEND_SLEEP_S  # Cut at the REST deadline, not when the backend answered.


def test_cors_headers_and_preflight(router):
  with urllib.request.urlopen(router.url + "/v1/models/ok", timeout=30) as response:
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "x-request-id" in response.headers["Access-Control-Expose-Headers"]
  preflight = urllib.request.Request(router.url + "/v1/models/ok:predict", method="OPTIONS")
  with urllib.request.urlopen(preflight, timeout=30) as response:
    assert response.status == 204


def test_monitoring_config_path_answers_the_metrics(router):
  router.get("/v1/models/ok")
  text = router.metrics_text("/metrics")
  assert 'method="GetModelStatus"' in text and "ok" in text


def test_grpc_channel_arguments_apply_to_the_routers_port(router):
  from tests.helpers.model_server import predict_request

  large = predict_request(np.zeros((4, MAX_MESSAGE // 4), np.float32), name="ok")
  with pytest.raises(grpc.RpcError) as error:
    router.predict_stub.Predict(large, timeout=30)
  assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--rest_api_num_threads=0", "--rest_api_num_threads=0 must be at least 1"),
    ("--rest_api_timeout_in_ms=-5", "--rest_api_timeout_in_ms=-5 must be at least 1"),
    ("--grpc_channel_arguments=grpc.keepalive_time_ms", "--grpc_channel_arguments entry"),
    ("--rest_read_timeout_seconds=0", "--rest_read_timeout_seconds=0.0 must be above 0"),
  ],
)
def test_bad_front_flags_are_one_error_line(flag, message):
  proc = model_server.run_module("serving.router", "--backend=127.0.0.1:1", flag)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), proc.stderr


def test_the_router_and_the_server_list_the_same_front_flags():
  """Each program's --help lists every flag of front_flags (absl key flags)."""
  from absl import flags

  from serving.server import front_flags

  names = [v.name for v in vars(front_flags).values() if isinstance(v, flags.FlagHolder)]
  for module in ("serving.router", "serving.server"):
    proc = model_server.run_module(module, "--help")
    text = proc.stdout + proc.stderr
    missing = [n for n in names if f"--{n}:" not in text and f"--[no]{n}:" not in text]
    assert not missing, (module, missing)
