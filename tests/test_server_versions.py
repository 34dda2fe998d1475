"""The model server's versions: a new version swapped in under load without a failed request, a
broken version reported, never served and retried, a dangling label stopping the start, and
one log line for each load and unload. One server for the module, never stopped before its
last test; the tests change its base path on disk in order."""

import os
import shutil
import threading
import time

import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from tensorflow_serving.apis import get_model_status_pb2  # noqa: E402

from tests.helpers import model_server  # noqa: E402
from tests.helpers.model_server import (  # noqa: E402
  POLL_SECONDS,
  check_outputs,
  outputs_of,
  predict_request,
  wait_for,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return model_server.digits_export(tmp_path_factory)


@pytest.fixture(scope="module")
def server(digits, tmp_path_factory):
  base = str(tmp_path_factory.mktemp("models") / "digits")
  model_server.copy_version(digits[1], base)
  args = [*model_server.QUICK_ARGS, "--model_name=digits", f"--model_base_path={base}"]
  log = str(tmp_path_factory.mktemp("logs") / "server.log")
  with model_server.Server(args, log, base=base) as server:
    yield server


@pytest.fixture(scope="module")
def pixels():
  return model_server.digits_pixels()


@pytest.fixture(scope="module")
def expected(digits, pixels):
  return model_server.jax_digits_outputs(digits[0], pixels)


def _status(server) -> dict[int, tuple[str, str]]:
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = "digits"
  states = get_model_status_pb2.ModelVersionStatus.State
  response = server.model_stub.GetModelStatus(request, timeout=30)
  return {
    s.version: (states.Name(s.state), s.status.error_message) for s in response.model_version_status
  }


def test_new_version_is_swapped_in_under_load_without_a_failure(server, digits, pixels, expected):
  """Version 2 dropped in while a client loops is served within the poll interval (plus its
  load and warmup); then version 1 is unloaded. Not one request fails."""
  versions_seen, failures, stop = [], [], threading.Event()

  def client_loop():
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
      try:
        response = server.predict_stub.Predict(predict_request(pixels[:4]), timeout=30)
        versions_seen.append((time.monotonic(), response.model_spec.version.value))
        check_outputs(outputs_of(response), expected, slice(4))
      except Exception as e:
        failures.append(repr(e))

  thread = threading.Thread(target=client_loop)
  thread.start()
  try:
    wait_for(lambda: len(versions_seen) >= 5, 30, "requests before the swap")
    dropped = time.monotonic()
    model_server.copy_version(digits[1], server.base, 2)  # Atomic, as export does it.
    wait_for(lambda: any(v == 2 for _, v in versions_seen), 60, "version 2 served")
    first_v2 = min(t for t, v in versions_seen if v == 2)
    count_at_swap = len(versions_seen)
    wait_for(lambda: len(versions_seen) >= count_at_swap + 5, 30, "requests after the swap")
  finally:
    stop.set()
    thread.join(timeout=60)
  assert failures == []
  assert first_v2 - dropped < POLL_SECONDS + 30  # Poll interval plus load and warmup.
  assert all(v == 2 for t, v in versions_seen if t > first_v2 + 0.5)
  wait_for(lambda: _status(server).get(1, ("",))[0] == "END", 10, "version 1 unloaded")
  assert _status(server) == {1: ("END", ""), 2: ("AVAILABLE", "")}
  log = server.log_text()
  assert "Serving digits version 2 (2 warmup requests)" in log
  assert "Unloaded digits version 1 (not in the aspired versions [2])" in log


def test_a_broken_version_is_reported_never_served_and_retried(server, pixels):
  """A version whose load fails (here: its files are still being copied) is reported and not
  served; the previous one keeps serving. Once the copy completes, a retry loads it."""
  served = server.predict_stub.Predict(predict_request(pixels[:2]), timeout=30)
  previous = served.model_spec.version.value
  broken = os.path.join(server.base, "3")
  os.makedirs(broken + ".tmp")
  with open(os.path.join(broken + ".tmp", "saved_model.pb"), "wb") as f:
    f.write(b"not a SavedModel")
  os.rename(broken + ".tmp", broken)
  try:
    _, error = wait_for(
      lambda: _status(server).get(3, ("", ""))[0] == "END" and _status(server)[3], 30, "v3 failed"
    )
    assert "saved_model.pb" in error or "SavedModel" in error, error

    def failed_over_rest():  # Polled: a retry may be under way.
      status = server.get("/v1/models/digits/versions/3")[1]["model_version_status"][0]
      return status if status["state"] == "END" else None

    rest_status = wait_for(failed_over_rest, 10, "v3 reported over REST")
    assert rest_status["status"]["error_code"] == "UNKNOWN"
    assert rest_status["status"]["error_message"]
    latest = server.predict_stub.Predict(predict_request(pixels[:2]), timeout=30)
    assert latest.model_spec.version.value == previous  # The previous version keeps serving.
    with pytest.raises(grpc.RpcError) as error_3:
      server.predict_stub.Predict(predict_request(pixels[:2], version=3), timeout=30)
    assert error_3.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Loading digits version 3 failed (attempt 1 of 101)" in server.log_text()

    shutil.copytree(os.path.join(server.base, str(previous)), broken, dirs_exist_ok=True)
    wait_for(lambda: _status(server).get(3, ("",))[0] == "AVAILABLE", 60, "v3 loaded on retry")
    latest = server.predict_stub.Predict(predict_request(pixels[:2]), timeout=30)
    assert latest.model_spec.version.value == 3
  finally:
    shutil.rmtree(broken)
  wait_for(lambda: 3 not in _status(server), 10, "removed version forgotten")
  wait_for(
    lambda: _status(server).get(previous, ("",))[0] == "AVAILABLE", 60, "previous served again"
  )
  assert "Unloaded digits version 3 (removed from disk)" in server.log_text()


def test_a_label_naming_no_available_version_stops_the_server_at_start(tmp_path):
  proc = model_server.run_module(
    "serving.server",
    "--port=0",
    "--model_name=digits",
    f"--model_base_path={tmp_path}",
    "--version_labels=stable=1",
  )
  assert proc.returncode == 1
  assert "version labels may only name available versions" in proc.stderr
  assert "model digits: stable=1" in proc.stderr
