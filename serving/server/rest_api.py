"""TF Serving's REST API on the standard library's ThreadingHTTPServer.

  GET  /v1/models/NAME[/versions/N | /labels/L]            model status
  GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   signature_def metadata
  POST /v1/models/NAME[/versions/N | /labels/L]:predict    row ("instances") or columnar ("inputs")
  POST /v1/models/NAME[/versions/N | /labels/L]:classify   {"examples": [...], "context": {...}}
  POST /v1/models/NAME[/versions/N | /labels/L]:regress    (tf.Example features as JSON)
  GET  /monitoring/prometheus/metrics

Errors are `{"error": "..."}` with 404 (not found), 400 (invalid argument, failed precondition),
413 (request too large), 503 (unavailable) or 500.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
import time

import grpc
import numpy as np
from absl import logging

from serving.server import classify_regress
from serving.server.metrics import Metrics
from serving.server.model_manager import ServedModels, ServingError, TensorSpec

_ROUTE = re.compile(
  r"^/v1/models/(?P<name>[^/:]+)"
  r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
  r"(?P<action>/metadata|:predict|:classify|:regress)?$"
)
_HTTP_STATUS = {
  grpc.StatusCode.OK: 200,
  grpc.StatusCode.NOT_FOUND: 404,
  grpc.StatusCode.INVALID_ARGUMENT: 400,
  grpc.StatusCode.FAILED_PRECONDITION: 400,
  grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
  grpc.StatusCode.UNAVAILABLE: 503,
}
_DT_STRING = 7  # tensorflow.DataType


class _Server(http.server.ThreadingHTTPServer):
  # Shutdown waits for requests in flight.
  daemon_threads = False
  block_on_close = True

  def __init__(self, address, manager: ServedModels, metrics: Metrics, max_request_size_bytes):
    super().__init__(address, _RequestHandler)
    self.manager = manager
    self.metrics = metrics
    self.max_request_size_bytes = max_request_size_bytes
    self.shutting_down = threading.Event()

  def shutdown(self):
    self.shutting_down.set()  # Connections close after their current request.
    super().shutdown()


class _RequestHandler(http.server.BaseHTTPRequestHandler):
  server: _Server
  protocol_version = "HTTP/1.1"
  # Seconds an idle keep-alive connection is held open (shutdown waits for open connections).
  timeout = 10

  def log_message(self, format, *args):
    logging.debug("REST %s: " + format, self.address_string(), *args)

  def do_GET(self):
    if self.path == "/monitoring/prometheus/metrics":
      self._send(200, self.server.metrics.exposition(), "text/plain; version=0.0.4")
      return
    self._handle("GET")

  def do_POST(self):
    self._handle("POST")

  def _handle(self, method: str) -> None:
    start = time.perf_counter()
    match = _ROUTE.match(self.path)
    name = match["name"] if match else ""
    version = int(match["version"]) if match and match["version"] else None
    action = (match["action"] or "") if match else ""
    rpc = {
      "": "GetModelStatus",
      "/metadata": "GetModelMetadata",
      ":predict": "Predict",
      ":classify": "Classify",
      ":regress": "Regress",
    }[action]
    try:
      body = self._read_body()  # Always drained, so the connection stays usable.
      if not match:
        raise ServingError(
          grpc.StatusCode.INVALID_ARGUMENT
          if self.path.startswith("/v1/")
          else grpc.StatusCode.NOT_FOUND,
          f"Malformed request: {method} {self.path}",
        )
      if (method == "POST") != action.startswith(":"):
        raise ServingError(
          grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: {method} {self.path}"
        )
      manager, label = self.server.manager, match["label"] or ""
      if action == ":predict":
        result, version = predict(manager, name, version, label, body)
      elif action in (":classify", ":regress"):
        result, version = classify_regress.rest(action[1:], manager, name, version, label, body)
      elif action == "/metadata":
        result, version = metadata(manager, name, version, label)
      else:
        result = status(manager, name, version, label)
      code = grpc.StatusCode.OK
    except ServingError as e:
      code, result = e.code, {"error": e.message}
    except Exception as e:
      logging.exception("REST %s %s failed", method, self.path)
      code, result = grpc.StatusCode.INTERNAL, {"error": f"{type(e).__name__}: {e}"}
    self.server.metrics.observe("rest", rpc, name, version, code.name, time.perf_counter() - start)
    self._send(_HTTP_STATUS.get(code, 500), json.dumps(result).encode(), "application/json")

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
    return self.rfile.read(length) if length else b""

  def _send(self, http_status: int, payload: bytes, content_type: str) -> None:
    self.send_response(http_status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(payload)))
    if self.server.shutting_down.is_set():
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(payload)


def status(manager: ServedModels, name: str, version: int | None, label: str) -> dict:
  return {
    "model_version_status": [
      {
        "version": str(s.version),
        "state": s.state,
        "status": {"error_code": "UNKNOWN" if s.error else "OK", "error_message": s.error},
      }
      for s in manager.status(name, version, label)
    ]
  }


def metadata(manager: ServedModels, name: str, version: int | None, label: str):
  from google.protobuf import json_format
  from tensorflow_serving.apis import get_model_metadata_pb2

  served = manager.resolve(name, version, label)
  signature_defs = get_model_metadata_pb2.SignatureDefMap()
  for key, signature_def in served.signature_defs.items():
    signature_defs.signature_def[key].CopyFrom(signature_def)
  result = {
    "model_spec": {"name": served.model_name, "signature_name": "", "version": str(served.version)},
    "metadata": {
      "signature_def": json_format.MessageToDict(signature_defs, preserving_proto_field_name=True)
    },
  }
  return result, served.version


def predict(manager: ServedModels, name: str, version: int | None, label: str, body: bytes):
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
  served = manager.resolve(name, version, label)
  signature = served.signature(request.get("signature_name", ""))
  row_format = "instances" in request
  named = _named_inputs(request, signature.inputs, row_format)
  inputs = {key: _to_array(key, value, signature.inputs.get(key)) for key, value in named.items()}
  outputs = served.run(signature.name, inputs, ())
  if row_format:
    return {"predictions": _rows(outputs)}, served.version
  columns = {key: _to_json(key, value) for key, value in outputs.items()}
  return {"outputs": next(iter(columns.values())) if len(columns) == 1 else columns}, served.version


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
  manager: ServedModels, metrics: Metrics, host: str, port: int, *, max_request_size_bytes: int
) -> http.server.ThreadingHTTPServer:
  """A bound (not yet serving) REST server; call `serve_forever()` in a thread."""
  return _Server((host, port), manager, metrics, max_request_size_bytes)
