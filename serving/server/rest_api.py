"""TF Serving's REST API on the standard library's ThreadingHTTPServer.

  GET  /v1/models/NAME[/versions/N | /labels/L]            model status
  GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   signature_def metadata
  POST /v1/models/NAME[/versions/N | /labels/L]:predict    row ("instances") or columnar ("inputs")
  POST /v1/models/NAME[/versions/N | /labels/L]:classify   {"examples": [...], "context": {...}}
  POST /v1/models/NAME[/versions/N | /labels/L]:regress    (tf.Example features as JSON)
  POST /v1/models/NAME/feedback   {"request_id": ..., "label": INT[, "row": INT]} (this project's
                                  extension: ground truth next to the prediction log)
  GET  /monitoring/prometheus/metrics  (and --monitoring_config_file's path, if it sets one)

Errors are `{"error": "..."}` with TF Serving's HTTP code for the status (404 not found, 400
invalid argument or failed precondition, 429 resource exhausted, 501 unimplemented, 503
unavailable, 504 deadline exceeded, ...; `http_status`), except a body over the size limit:
413, so clients do not retry it as they would a 429. A thin transport:
the route and JSON are decoded here, the work is the one request path's (handlers.RequestPath).

Hostile clients: the listen backlog is the kernel's maximum (SOMAXCONN); at most
`max_connections` connections are served at once (others get 503 and are closed); a request's
line, headers and body must arrive within `read_timeout_seconds` of its first byte (a client
sending a header line every few seconds is cut off); a connection idle for 10 s is closed; a
client that disconnects is logged in one line.

As TF Serving's REST server: `num_threads` requests are processed at once (the others wait), and
each has a deadline `timeout_seconds` after its body arrived; one that passes it waiting for a
thread or a batch is answered 504 without running its model.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import re
import socket
import sys
import threading
import time

import grpc
from absl import logging

from serving.server import monitoring_config, request_context, rest_actions
from serving.server.errors import ServingError, deadline_exceeded
from serving.server.handlers import ModelSpec, RequestHandlers, RequestPath

_ROUTE = re.compile(
  r"^/v1/models/(?P<name>[^/:]+)"
  r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
  r"(?P<action>/metadata|/feedback|:predict|:classify|:regress)?$"
)
_METHODS = {
  "": "GetModelStatus",
  "/metadata": "GetModelMetadata",
  ":predict": "Predict",
  ":classify": "Classify",
  ":regress": "Regress",
  "/feedback": "Feedback",
}
_POST_ACTIONS = frozenset({":predict", ":classify", ":regress", "/feedback"})
# TF Serving's mapping (tensorflow_serving/model_servers/http_server.cc), for the router's
# forwarded statuses as much as this server's own.
_HTTP_STATUS = {
  grpc.StatusCode.OK: 200,
  grpc.StatusCode.CANCELLED: 499,
  grpc.StatusCode.INVALID_ARGUMENT: 400,
  grpc.StatusCode.DEADLINE_EXCEEDED: 504,
  grpc.StatusCode.NOT_FOUND: 404,
  grpc.StatusCode.ALREADY_EXISTS: 409,
  grpc.StatusCode.PERMISSION_DENIED: 403,
  grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
  grpc.StatusCode.FAILED_PRECONDITION: 400,
  grpc.StatusCode.ABORTED: 409,
  grpc.StatusCode.OUT_OF_RANGE: 400,
  grpc.StatusCode.UNIMPLEMENTED: 501,
  grpc.StatusCode.UNAVAILABLE: 503,
  grpc.StatusCode.UNAUTHENTICATED: 401,
}
_BODY_TOO_LARGE = 413


def http_status(code: grpc.StatusCode) -> int:
  """The HTTP status TF Serving's REST API answers for gRPC status `code` (500 for UNKNOWN,
  INTERNAL, DATA_LOSS)."""
  return _HTTP_STATUS.get(code, 500)


_TOO_MANY = (
  b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
  b'Connection: close\r\nContent-Length: 46\r\n\r\n{"error": "too many connections; retry later"}'
)
# What a page's script may read of a response under CORS: the request id and the split's arm.
_EXPOSED_HEADERS = f"{request_context.REQUEST_ID_HEADER}, {request_context.ARM_HEADER}"
# Seconds an idle connection (no byte of a next request) is held open.
IDLE_TIMEOUT_SECONDS = 10


class _Server(http.server.ThreadingHTTPServer):
  # Shutdown waits for requests in flight.
  daemon_threads = False
  block_on_close = True
  request_queue_size = socket.SOMAXCONN  # Python's default of 5 resets connections under load.

  def __init__(
    self,
    address,
    path: RequestPath,
    *,
    max_request_size_bytes,
    max_connections,
    read_timeout_seconds,
    metrics_paths,
    num_threads,
    timeout_seconds,
    cors,
  ):
    super().__init__(address, _RequestHandler)
    self.path = path
    self.metrics = path.metrics
    self.metrics_paths = metrics_paths
    self.max_request_size_bytes = max_request_size_bytes
    self.read_timeout_seconds = read_timeout_seconds
    self.shutting_down = threading.Event()
    self._slots = threading.BoundedSemaphore(max_connections)
    self.timeout_seconds = timeout_seconds
    self.cors = cors
    self._processing = threading.BoundedSemaphore(num_threads)

  @contextlib.contextmanager
  def processing_slot(self, deadline: float):
    """Holds one of the `num_threads` slots requests are processed in, waiting for one until
    `deadline`. Raises ServingError DEADLINE_EXCEEDED when none came free in time."""
    if not self._processing.acquire(timeout=max(0.0, deadline - time.monotonic())):
      raise deadline_exceeded("a REST thread was free (--rest_api_num_threads)")
    try:
      yield
    finally:
      self._processing.release()

  def process_request(self, request, client_address):
    if not self._slots.acquire(blocking=False):
      logging.warning("REST: refusing %s: %s", client_address[0], "too many connections")
      try:
        request.settimeout(1)
        request.sendall(_TOO_MANY)
      except OSError:
        pass
      self.shutdown_request(request)
      return
    super().process_request(request, client_address)

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()

  def handle_error(self, request, client_address):
    error = sys.exc_info()[1]
    if isinstance(error, ConnectionError | TimeoutError):
      logging.info("REST client %s: %s", client_address[0], _describe(error))
    else:
      logging.exception("REST connection from %s failed", client_address[0])

  def shutdown(self):
    self.shutting_down.set()  # Connections close after their current request.
    super().shutdown()


class _ReusePortServer(_Server):
  allow_reuse_port = True  # SO_REUSEPORT: the kernel spreads connections over the workers.


def _describe(error: BaseException) -> str:
  if isinstance(error, TimeoutError):
    return f"timed out ({error})"
  return f"disconnected ({type(error).__name__})"


class _BodyTooLarge(ServingError):
  """RESOURCE_EXHAUSTED for a body over --max_request_size_bytes, answered 413."""


class _DeadlineReader(io.RawIOBase):
  """A socket's bytes, each recv bounded by the idle timeout and, once a request's first byte
  arrived, by that request's deadline (so a trickle of bytes cannot hold a thread forever)."""

  def __init__(self, sock: socket.socket, read_timeout_seconds: float):
    self._sock = sock
    self._read_timeout = read_timeout_seconds
    self.deadline: float | None = None

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    timeout = IDLE_TIMEOUT_SECONDS
    if self.deadline is not None:
      timeout = self.deadline - time.monotonic()
      if timeout <= 0:
        raise TimeoutError(f"request not received within {self._read_timeout} s")
    self._sock.settimeout(timeout)
    try:
      count = self._sock.recv_into(buffer)
    except TimeoutError:
      if self.deadline is None:
        raise TimeoutError(f"idle for {IDLE_TIMEOUT_SECONDS} s") from None
      raise TimeoutError(f"request not received within {self._read_timeout} s") from None
    if self.deadline is None and count:
      self.deadline = time.monotonic() + self._read_timeout
    return count


class _RequestHandler(http.server.BaseHTTPRequestHandler):
  server: _Server
  protocol_version = "HTTP/1.1"
  timeout = IDLE_TIMEOUT_SECONDS

  def setup(self):
    super().setup()
    self._reader = _DeadlineReader(self.connection, self.server.read_timeout_seconds)
    self.rfile = io.BufferedReader(self._reader)

  def handle_one_request(self):
    self._reader.deadline = None  # Starts at the next request's first byte.
    super().handle_one_request()

  def log_message(self, format, *args):
    logging.debug("REST %s: " + format, self.address_string(), *args)

  def log_error(self, format, *args):  # Timeouts, malformed request lines: one line each.
    logging.info("REST client %s: " + format, self.address_string(), *args)

  def do_GET(self):
    if self.path in self.server.metrics_paths:
      self._send(200, self.server.metrics.exposition(), "text/plain; version=0.0.4")
      return
    self._handle("GET")

  def do_POST(self):
    self._handle("POST")

  def do_OPTIONS(self):
    """A browser's CORS preflight: allowed (any origin, the headers it asks for) with
    --rest_api_enable_cors_support, else 501 as any other unsupported method."""
    if not self.server.cors:
      message = {"error": "Unsupported method OPTIONS; start with --rest_api_enable_cors_support"}
      self._send(501, json.dumps(message).encode(), "application/json")
      return
    asked = self.headers.get("Access-Control-Request-Headers")
    self._send(
      204,
      b"",
      "text/plain",
      {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": asked or "Content-Type",
        "Access-Control-Max-Age": "600",
      },
    )

  def _handle(self, method: str) -> None:
    match = _ROUTE.match(self.path)
    action = (match["action"] or "") if match else ""
    spec = ModelSpec(
      match["name"] if match else "",
      int(match["version"]) if match and match["version"] else None,
      (match["label"] or "") if match else "",
    )
    body, error, too_large = None, None, False
    try:
      body = self._read_body()  # Always drained, so the connection stays usable.
    except _BodyTooLarge as e:
      error, too_large = e, True
    except ServingError as e:
      error = e

    def work(handlers: RequestHandlers):
      if error is not None:
        raise error
      if not match or (method == "POST") != (action in _POST_ACTIONS):
        raise ServingError(
          grpc.StatusCode.INVALID_ARGUMENT
          if self.path.startswith("/v1/")
          else grpc.StatusCode.NOT_FOUND,
          f"Malformed request: {method} {self.path}",
        )
      with self.server.processing_slot(deadline):
        return rest_actions.ACTIONS[action](handlers, spec, body)

    deadline = time.monotonic() + self.server.timeout_seconds  # From the body's arrival.
    outcome = self.server.path.serve("rest", _METHODS[action], spec, work, self.headers, deadline)
    result = outcome.value if outcome.code == grpc.StatusCode.OK else {"error": outcome.message}
    extra = {request_context.REQUEST_ID_HEADER: outcome.request_id}
    if outcome.arm is not None:
      extra[request_context.ARM_HEADER] = outcome.arm
    status = _BODY_TOO_LARGE if too_large else http_status(outcome.code)
    self._send(status, json.dumps(result).encode(), "application/json", extra)

  def _read_body(self) -> bytes:
    header = self.headers.get("Content-Length") or "0"
    if not header.isdigit() or "Transfer-Encoding" in self.headers:
      self.close_connection = True  # Where this body ends is unknown: drop the connection.
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"send the body with a Content-Length (got {header!r}; chunked bodies are not supported)",
      )
    length = int(header)
    if length > self.server.max_request_size_bytes:
      self.close_connection = True  # Not read: the connection cannot be reused.
      raise _BodyTooLarge(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"request of {length} bytes exceeds --max_request_size_bytes="
        f"{self.server.max_request_size_bytes}",
      )
    body = self.rfile.read(length) if length else b""
    if len(body) < length:
      raise ConnectionResetError(f"body ended after {len(body)} of {length} bytes")
    return body

  def _send(self, status: int, payload: bytes, content_type: str, extra=None) -> None:
    self.connection.settimeout(IDLE_TIMEOUT_SECONDS)  # Reads may have left a shorter one.
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    for name, value in (extra or {}).items():
      self.send_header(name, value)
    if self.server.cors:
      self.send_header("Access-Control-Allow-Origin", "*")
      self.send_header("Access-Control-Expose-Headers", _EXPOSED_HEADERS)
    self.send_header("Content-Length", str(len(payload)))
    if self.server.shutting_down.is_set():
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(payload)


def build(
  path: RequestPath,
  host: str,
  port: int,
  *,
  max_request_size_bytes: int,
  max_connections: int = 512,
  read_timeout_seconds: float = 30.0,
  reuse_port: bool = False,
  metrics_paths: frozenset[str] = frozenset({monitoring_config.DEFAULT_PATH}),
  num_threads: int | None = None,
  timeout_seconds: float = 30.0,
  cors: bool = False,
) -> http.server.ThreadingHTTPServer:
  """A bound (not yet serving) REST server; call `serve_forever()` in a thread. `reuse_port`:
  other processes may bind the same port (--num_workers). `metrics_paths`: where GET answers
  the Prometheus metrics (serving/server/monitoring_config.py). `num_threads` requests (default
  4 per CPU) are processed at once; each must start within `timeout_seconds` of its body's
  arrival (waiting for a thread or a batch included), else it gets 504. `cors`: CORS headers
  for any origin, and OPTIONS preflights answered."""
  server_class = _ReusePortServer if reuse_port else _Server
  return server_class(
    (host, port),
    path,
    max_request_size_bytes=max_request_size_bytes,
    max_connections=max_connections,
    read_timeout_seconds=read_timeout_seconds,
    metrics_paths=metrics_paths,
    num_threads=num_threads or 4 * (os.cpu_count() or 1),
    timeout_seconds=timeout_seconds,
    cors=cors,
  )
