"""The model server against hostile REST clients (slow headers held open, disconnects, more
connections than its cap) and on SIGTERM (health NOT_SERVING, the request in flight finished,
exit 0). Each server here is started for its own test."""

import json
import os
import signal
import socket
import time

import pytest

pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tests.helpers import model_server  # noqa: E402
from tests.helpers.model_server import wait_for  # noqa: E402

ROW = [1.0] * 64
SLOW_CLIENTS = 200
READ_TIMEOUT_SECONDS = 15
MAX_CONNECTIONS = SLOW_CLIENTS + 10


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return model_server.digits_export(tmp_path_factory)


def _start(digits, tmp_path, *flags) -> model_server.Server:
  base = str(tmp_path / "models" / "digits")
  model_server.copy_version(digits[1], base)
  args = [*model_server.QUICK_ARGS, "--model_name=digits", f"--model_base_path={base}", *flags]
  return model_server.Server(args, str(tmp_path / "server.log"), base=base)


def _predict_ok(server) -> bool:
  status, result = server.request("POST", "/v1/models/digits:predict", {"instances": [ROW]})
  return status == 200 and len(result["predictions"]) == 1


def _slow_socket(server) -> socket.socket:
  """A connection that sent a request line and one header, and never finishes its headers."""
  conn = socket.create_connection(("127.0.0.1", server.rest_port), timeout=60)
  conn.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n")
  return conn


def _closed_by_server(conn: socket.socket) -> bytes | None:
  """What the server sent before closing `conn` (b"" for nothing), or None if still open."""
  conn.settimeout(0)
  try:
    data = conn.recv(65536)
  except BlockingIOError:
    return None
  except ConnectionResetError:
    return b""
  return data  # b"": an orderly close.


def _first_answer(conn: socket.socket, timeout_s: float) -> bytes:
  """The server's first bytes on `conn` (b"" if it closed it), waiting up to `timeout_s`."""
  conn.settimeout(timeout_s)
  try:
    return conn.recv(65536)
  except TimeoutError:
    return b"(no answer)"
  except ConnectionResetError:
    return b""


@pytest.fixture(scope="module")
def hostile_server(digits, tmp_path_factory):
  """A server for the hostile-client tests: a 15 s read timeout, 210 connections at most."""
  server = _start(
    digits,
    tmp_path_factory.mktemp("hostile"),
    f"--rest_read_timeout_seconds={READ_TIMEOUT_SECONDS}",
    f"--rest_max_connections={MAX_CONNECTIONS}",
  )
  with server:
    yield server


def test_slow_clients_are_cut_off_while_real_requests_succeed(hostile_server):
  server = hostile_server
  opened = time.monotonic()  # No slow socket's deadline starts before this.
  slow = [_slow_socket(server) for _ in range(SLOW_CLIENTS)]
  try:
    assert all(_predict_ok(server) for _ in range(10))  # 10 connections still free.
    # Beyond the cap a connection is answered 503 and closed at once.
    extra = [_slow_socket(server) for _ in range(15)]
    answers = [_first_answer(c, timeout_s=10) for c in extra[-5:]]
    assert any(a.startswith(b"HTTP/1.1 503") and b"too many connections" in a for a in answers)
    for conn in extra:
      conn.close()
    held_for = time.monotonic() - opened
    assert held_for < READ_TIMEOUT_SECONDS, f"the checks took {held_for:.1f} s: inconclusive"
    still_open = [c for c in slow if _closed_by_server(c) is None]
    assert still_open, "the slow clients were closed before the read timeout"
    wait_for(
      lambda: all(_closed_by_server(c) is not None for c in slow),
      READ_TIMEOUT_SECONDS + 30,
      "every slow client closed by the read timeout",
      interval_s=0.5,
    )
    assert time.monotonic() - opened >= READ_TIMEOUT_SECONDS - 1  # Not before its time.
    assert _predict_ok(server)
  finally:
    for conn in slow:
      conn.close()
  wait_for(lambda: "timed out" in server.log_text(), 10, "timeouts logged")
  log = server.log_text()
  assert "Traceback" not in log, log[-3000:]
  timeouts = [line for line in log.splitlines() if "request not received within" in line]
  assert len(timeouts) >= SLOW_CLIENTS // 2, log[-3000:]


def test_a_client_disconnect_is_one_log_line_not_a_traceback(hostile_server):
  server = hostile_server
  for _ in range(3):
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as conn:
      conn.sendall(
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
      )  # Then gone, 999 bytes short.
  body = json.dumps({"instances": [ROW] * 512}).encode()  # A large answer...
  for _ in range(3):
    conn = socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.sendall(
      b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n"
      + f"Content-Length: {len(body)}\r\n\r\n".encode()
      + body
    )
    conn.close()  # ...never read: the connection is reset.
  wait_for(lambda: server.log_text().count("disconnected (") >= 3, 30, "disconnects logged")
  assert _predict_ok(server)
  log = server.log_text()
  assert "Traceback" not in log and "BrokenPipeError" not in log.replace(
    "disconnected (BrokenPipeError)", ""
  ), log[-3000:]
  lines = [line for line in log.splitlines() if "disconnected (" in line]
  assert all("REST client 127.0.0.1: disconnected (" in line for line in lines), lines


def test_sigterm_turns_health_not_serving_finishes_the_request_in_flight_and_exits_0(
  digits, tmp_path
):
  server = _start(digits, tmp_path)
  with server:
    health = health_pb2_grpc.HealthStub(server.channel)
    check = health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService")
    assert health.Check(check, timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    body = json.dumps({"instances": [ROW] * 4}).encode()
    request = (
      b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=60) as conn:
      reader = conn.makefile("rb")
      conn.sendall(request + body)  # A first request: the connection is now being served.
      assert reader.readline().startswith(b"HTTP/1.1 200")
      headers = list(iter(reader.readline, b"\r\n"))
      length = next(
        int(h.split(b":")[1]) for h in headers if h.lower().startswith(b"content-length")
      )
      reader.read(length)
      conn.sendall(request + body[:10])  # The second is in flight when SIGTERM arrives.
      server.proc.send_signal(signal.SIGTERM)
      wait_for(
        lambda: (
          health.Check(check, timeout=30).status == health_pb2.HealthCheckResponse.NOT_SERVING
        ),
        30,
        "health NOT_SERVING after SIGTERM",
      )
      conn.sendall(body[10:])
      response = reader.read()  # Until the server closes the connection.
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert b"Connection: close" in response
    assert len(json.loads(response.split(b"\r\n\r\n", 1)[1])["predictions"]) == 4
    assert server.proc.wait(timeout=60) == 0, server.log_tail()
  with pytest.raises(OSError):
    socket.create_connection(("127.0.0.1", server.rest_port), timeout=5).close()


def _request_count(server, api: str, method: str) -> float:
  from prometheus_client.parser import text_string_to_metric_families

  return sum(
    sample.value
    for family in text_string_to_metric_families(server.metrics_text())
    for sample in family.samples
    if sample.name == "serving_requests_total"
    and sample.labels["api"] == api
    and sample.labels["method"] == method
    and sample.labels["code"] == "OK"
  )


def test_workers_share_the_ports_sum_their_metrics_and_all_drain_on_sigterm(digits, tmp_path):
  """--num_workers=2: the kernel spreads connections over two processes; every worker's metrics
  page counts every worker's requests; SIGTERM stops both and the supervisor exits 0."""
  from tensorflow_serving.apis import model_management_pb2

  server = _start(digits, tmp_path, "--num_workers=2")
  with server:
    serving = ("Worker 0: Serving digits", "Worker 1: Serving digits")
    wait_for(lambda: all(w in server.log_text() for w in serving), 300, "both workers serving")
    with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
      workers = [int(pid) for pid in f.read().split()]
    assert len(workers) == 2
    connections = 40  # One each: with 2 workers, the odds that one got them all are 2**-39.
    assert all(_predict_ok(server) for _ in range(connections))
    # Whichever worker answers the metrics page reports both workers' requests.
    assert _request_count(server, "rest", "Predict") == connections
    with pytest.raises(grpc.RpcError) as error:
      server.model_stub.HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(), timeout=60
      )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--num_workers > 1" in error.value.details()
  assert server.proc.returncode == 0, server.log_tail()
  for pid in workers:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
