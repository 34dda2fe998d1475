"""TF Serving's REST API on the standard library's ThreadingHTTPServer.

  GET  /v1/models/NAME[/versions/N | /labels/L]            model status
  GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   signature_def metadata
  POST /v1/models/NAME[/versions/N | /labels/L]:predict    row ("instances") or columnar ("inputs")
  POST /v1/models/NAME[/versions/N | /labels/L]:classify   {"examples": [...], "context": {...}}
  POST /v1/models/NAME[/versions/N | /labels/L]:regress    (tf.Example features as JSON)
  GET  /monitoring/prometheus/metrics

Errors are `{"error": "..."}` with 404 (not found), 400 (invalid argument, failed precondition),
413 (request too large), 503 (unavailable) or 500. A thin transport: the route and JSON are
decoded here, the work is the one request path's (handlers.RequestPath).

Hostile clients: the listen backlog is the kernel's maximum (SOMAXCONN); at most
`max_connections` connections are served at once (others get 503 and are closed); a request's
line, headers and body must arrive within `read_timeout_seconds` of its first byte (a client
sending a header line every few seconds is cut off); a connection idle for 10 s is closed; a
client that disconnects is logged in one line.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import socket
import sys
import threading
import time

import grpc
import numpy as np
from absl import logging

from serving.server import classify_regress
from serving.server.errors import ServingError
from serving.server.handlers import ModelSpec, RequestHandlers, RequestPath
from serving.server.loaded_version import SignatureInfo, TensorSpec

_ROUTE = re.compile(
  r"^/v1/models/(?P<name>[^/:]+)"
  r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
  r"(?P<action>/metadata|:predict|:classify|:regress)?$"
)
_METHODS = {
  "": "GetModelStatus",
  "/metadata": "GetModelMetadata",
  ":predict": "Predict",
  ":classify": "Classify",
  ":regress": "Regress",
}
_HTTP_STATUS = {
  grpc.StatusCode.OK: 200,
  grpc.StatusCode.NOT_FOUND: 404,
  grpc.StatusCode.INVALID_ARGUMENT: 400,
  grpc.StatusCode.FAILED_PRECONDITION: 400,
  grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
  grpc.StatusCode.UNAVAILABLE: 503,
}
_DT_STRING = 7  # tensorflow.DataType
_TOO_MANY = (
  b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
  b'Connection: close\r\nContent-Length: 46\r\n\r\n{"error": "too many connections; retry later"}'
)
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
  ):
    super().__init__(address, _RequestHandler)
    self.path = path
    self.metrics = path.metrics
    self.max_request_size_bytes = max_request_size_bytes
    self.read_timeout_seconds = read_timeout_seconds
    self.shutting_down = threading.Event()
    self._slots = threading.BoundedSemaphore(max_connections)

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


def _describe(error: BaseException) -> str:
  if isinstance(error, TimeoutError):
    return f"timed out ({error})"
  return f"disconnected ({type(error).__name__})"


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
    count = self._sock.recv_into(buffer)
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
    if self.path == "/monitoring/prometheus/metrics":
      self._send(200, self.server.metrics.exposition(), "text/plain; version=0.0.4")
      return
    self._handle("GET")

  def do_POST(self):
    self._handle("POST")

  def _handle(self, method: str) -> None:
    match = _ROUTE.match(self.path)
    action = (match["action"] or "") if match else ""
    spec = ModelSpec(
      match["name"] if match else "",
      int(match["version"]) if match and match["version"] else None,
      (match["label"] or "") if match else "",
    )
    body = None
    try:
      body = self._read_body()  # Always drained, so the connection stays usable.
    except ServingError as e:
      error = e
    else:
      error = None

    def work(handlers: RequestHandlers):
      if error is not None:
        raise error
      if not match or (method == "POST") != action.startswith(":"):
        raise ServingError(
          grpc.StatusCode.INVALID_ARGUMENT
          if self.path.startswith("/v1/")
          else grpc.StatusCode.NOT_FOUND,
          f"Malformed request: {method} {self.path}",
        )
      return _ACTIONS[action](handlers, spec, body)

    outcome = self.server.path.serve("rest", _METHODS[action], spec, work)
    result = outcome.value if outcome.code == grpc.StatusCode.OK else {"error": outcome.message}
    self._send(_HTTP_STATUS.get(outcome.code, 500), json.dumps(result).encode(), "application/json")

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
      raise ServingError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"request of {length} bytes exceeds --max_request_size_bytes="
        f"{self.server.max_request_size_bytes}",
      )
    body = self.rfile.read(length) if length else b""
    if len(body) < length:
      raise ConnectionResetError(f"body ended after {len(body)} of {length} bytes")
    return body

  def _send(self, http_status: int, payload: bytes, content_type: str) -> None:
    self.connection.settimeout(IDLE_TIMEOUT_SECONDS)  # Reads may have left a shorter one.
    self.send_response(http_status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(payload)))
    if self.server.shutting_down.is_set():
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(payload)


# The actions: (handlers, spec from the URL, body) -> a JSON-able answer with `.served`.


class _Answer(dict):
  """A JSON object that also names the version that answered (for the metrics)."""

  def __init__(self, value: dict, served=None):
    super().__init__(value)
    self.served = served


def status(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> dict:
  return {
    "model_version_status": [
      {
        "version": str(s.version),
        "state": s.state,
        "status": {"error_code": "UNKNOWN" if s.error else "OK", "error_message": s.error},
      }
      for s in handlers.status(spec)
    ]
  }


def metadata(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> _Answer:
  from google.protobuf import json_format

  answer = handlers.metadata(spec, ["signature_def"])
  served = answer.served
  signature_defs = json_format.MessageToDict(
    answer.signature_defs, preserving_proto_field_name=True
  )
  return _Answer(
    {
      "model_spec": {
        "name": served.model_name,
        "signature_name": "",
        "version": str(served.version),
      },
      "metadata": {"signature_def": signature_defs},
    },
    served,
  )


def predict(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> _Answer:
  """Row format ({"instances": [...]} -> {"predictions": [...]}) or columnar ({"inputs": ...}
  -> {"outputs": ...}), as TF Serving's REST API."""
  try:
    request = json.loads(body or b"null")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"request body is not JSON: {e}") from e
  if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      'request must be a JSON object with exactly one of "instances" (row format) or "inputs" '
      "(columnar format)",
    )
  row_format = "instances" in request

  def inputs(signature: SignatureInfo) -> dict[str, np.ndarray]:
    named = _named_inputs(request, signature.inputs, row_format)
    return {key: _to_array(key, value, signature.inputs.get(key)) for key, value in named.items()}

  signature_name = request.get("signature_name", "")
  prediction = handlers.predict(_with_signature(spec, signature_name), inputs)
  outputs = prediction.outputs
  if row_format:
    return _Answer({"predictions": _rows(outputs)}, prediction.served)
  columns = {key: _to_json(key, value) for key, value in outputs.items()}
  value = next(iter(columns.values())) if len(columns) == 1 else columns
  return _Answer({"outputs": value}, prediction.served)


def classify(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> _Answer:
  parsed = classify_regress.examples_from_json(body, "classify")
  answer = handlers.classify(_with_signature(spec, parsed.signature_name), parsed.to_input)
  return _Answer(classify_regress.classification_json(answer.result), answer.served)


def regress(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> _Answer:
  parsed = classify_regress.examples_from_json(body, "regress")
  answer = handlers.regress(_with_signature(spec, parsed.signature_name), parsed.to_input)
  return _Answer(classify_regress.regression_json(answer.result), answer.served)


def _with_signature(spec: ModelSpec, signature_name) -> ModelSpec:
  if not isinstance(signature_name, str):
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "'signature_name' must be a string")
  return ModelSpec(spec.name, spec.version, spec.label, signature_name)


_ACTIONS = {
  "": status,
  "/metadata": metadata,
  ":predict": predict,
  ":classify": classify,
  ":regress": regress,
}


def _named_inputs(request: dict, specs: dict[str, TensorSpec], row_format: bool) -> dict:
  data = request["instances" if row_format else "inputs"]
  only = next(iter(specs)) if len(specs) == 1 else None
  if row_format:
    if not isinstance(data, list) or not data:
      raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, '"instances" must be a non-empty list')
    if all(isinstance(row, dict) and "b64" not in row for row in data):
      keys = set(data[0])
      if any(set(row) != keys for row in data):
        raise ServingError(
          grpc.StatusCode.INVALID_ARGUMENT, "every instance must name the same inputs"
        )
      return {key: [row[key] for row in data] for key in keys}
  elif isinstance(data, dict) and "b64" not in data:
    return data
  if only is None:
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      f"the signature takes inputs {sorted(specs)}: name them (a JSON object per instance, or "
      '"inputs": {name: value})',
    )
  return {only: data}


def _decode_b64(value):
  if isinstance(value, dict):
    if set(value) != {"b64"} or not isinstance(value["b64"], str):
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT, f'expected {{"b64": "<base64>"}}, got {value!r:.100}'
      )
    try:
      return base64.b64decode(value["b64"], validate=True)
    except ValueError as e:
      raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid base64: {e}") from e
  if isinstance(value, list):
    return [_decode_b64(v) for v in value]
  return value


def _to_array(name: str, value, spec: TensorSpec | None) -> np.ndarray:
  """JSON values -> an array of the signature's dtype (exact input names are checked later)."""
  import tensorflow as tf

  value = _decode_b64(value)
  try:
    if spec is not None and spec.dtype == _DT_STRING:
      return np.array(value, dtype=object)
    array = np.asarray(value)
  except ValueError as e:  # Ragged lists.
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}' is not a rectangular array: {e}"
    ) from e
  if spec is None:
    return array
  target = tf.as_dtype(spec.dtype)
  kind = array.dtype.kind
  compatible = (
    (kind == "b" and target.is_bool)
    or (kind in "iu" and (target.is_integer or target.is_floating))
    or (kind == "f" and target.is_floating)
  )
  if not compatible:
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      f"input '{name}' holds {array.dtype.name} values but the signature expects {target.name}",
    )
  return array.astype(target.as_numpy_dtype)


def _to_json(name: str, value: np.ndarray):
  if value.dtype == object or value.dtype.kind == "S":
    flat = [
      {"b64": base64.b64encode(v).decode()}
      if name.endswith("_bytes")
      else v.decode("utf-8", "replace")
      for v in value.reshape(-1)
    ]
    return np.array(flat, dtype=object).reshape(value.shape).tolist()
  return value.tolist()


def _rows(outputs: dict[str, np.ndarray]) -> list:
  columns = {key: _to_json(key, value) for key, value in outputs.items()}
  if len(columns) == 1:
    return next(iter(columns.values()))
  sizes = {len(v) if isinstance(v, list) else 0 for v in columns.values()}
  if len(sizes) != 1:
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      'outputs have different batch sizes; use the columnar format ("inputs")',
    )
  return [{key: value[i] for key, value in columns.items()} for i in range(sizes.pop())]


def build(
  path: RequestPath,
  host: str,
  port: int,
  *,
  max_request_size_bytes: int,
  max_connections: int = 512,
  read_timeout_seconds: float = 30.0,
) -> http.server.ThreadingHTTPServer:
  """A bound (not yet serving) REST server; call `serve_forever()` in a thread."""
  return _Server(
    (host, port),
    path,
    max_request_size_bytes=max_request_size_bytes,
    max_connections=max_connections,
    read_timeout_seconds=read_timeout_seconds,
  )
