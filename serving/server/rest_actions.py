"""The REST API's actions, protocol-free: (handlers, the URL's model spec, the body) -> a JSON
object, and TF Serving's JSON <-> numpy conversions for :predict (row and columnar formats,
`{"b64": ...}` for strings). rest_api.py routes requests here.
"""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np

from serving.server import classify_regress
from serving.server import feedback as feedback_file
from serving.server.errors import ServingError
from serving.server.handlers import ModelSpec, Reply, RequestHandlers
from serving.server.loaded_version import SignatureInfo, TensorSpec

_DT_STRING = 7  # tensorflow.DataType


# The actions: (handlers, spec from the URL, body) -> Reply(a JSON-able answer, what served it).


def status(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> Reply:
  return Reply(
    {
      "model_version_status": [
        {
          "version": str(s.version),
          "state": s.state,
          "status": {"error_code": "UNKNOWN" if s.error else "OK", "error_message": s.error},
        }
        for s in handlers.status(spec)
      ]
    }
  )


def metadata(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> Reply:
  from google.protobuf import json_format

  answer = handlers.metadata(spec, ["signature_def"])
  served = answer.served
  signature_defs = json_format.MessageToDict(
    answer.signature_defs, preserving_proto_field_name=True
  )
  return Reply(
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


def predict(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> Reply:
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
    return Reply({"predictions": _rows(outputs)}, prediction.served)
  columns = {key: _to_json(key, value) for key, value in outputs.items()}
  value = next(iter(columns.values())) if len(columns) == 1 else columns
  return Reply({"outputs": value}, prediction.served)


def classify(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> Reply:
  parsed = classify_regress.examples_from_json(body, "classify")
  answer = handlers.classify(_with_signature(spec, parsed.signature_name), parsed.to_input)
  return Reply(classify_regress.classification_json(answer.result), answer.served)


def regress(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> Reply:
  parsed = classify_regress.examples_from_json(body, "regress")
  answer = handlers.regress(_with_signature(spec, parsed.signature_name), parsed.to_input)
  return Reply(classify_regress.regression_json(answer.result), answer.served)


def feedback(handlers: RequestHandlers, spec: ModelSpec, body: bytes) -> Reply:
  """Records a request's ground truth (serving/server/feedback.py); per model, not version."""
  if spec.version is not None or spec.label:
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      f"feedback is per model: POST /v1/models/{spec.name}/feedback (no version or label)",
    )
  entry = feedback_file.parse_entry(body)
  handlers.record_feedback(spec.name, entry)
  return Reply({"request_id": entry["request_id"], "recorded": True})


def _with_signature(spec: ModelSpec, signature_name) -> ModelSpec:
  if not isinstance(signature_name, str):
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "'signature_name' must be a string")
  return ModelSpec(spec.name, spec.version, spec.label, signature_name)


ACTIONS = {
  "": status,
  "/metadata": metadata,
  ":predict": predict,
  ":classify": classify,
  ":regress": regress,
  "/feedback": feedback,
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
