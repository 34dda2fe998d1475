r"""A command-line gRPC client for TF Serving (this project's server or the real one).

  python -m serving.client --server=localhost:8500 --model=digits --input=batch.json [--json]
  python -m serving.client --server=localhost:8500 --model=digits --metadata
  python -m serving.client --server=localhost:8500 --model=digits --status

`--input` is JSON ({"inputs": [[...]]}, {"inputs": {"name": [...]}}, {"instances": [...]} or a
bare list) or an .npz of named arrays. Values are cast to the dtypes the signature declares (read
from the server's metadata). Exits 1 when the server is unreachable or answers an error.
"""

from __future__ import annotations

import json
import sys

import grpc
import numpy as np
from absl import app, flags

_SERVER = flags.DEFINE_string("server", "localhost:8500", "host:port of the gRPC API.")
_MODEL = flags.DEFINE_string("model", None, "Model name.")
_VERSION = flags.DEFINE_integer("version", None, "Model version; default: the latest.")
_VERSION_LABEL = flags.DEFINE_string("version_label", "", "Version label instead of --version.")
_SIGNATURE = flags.DEFINE_string("signature_name", "", "Signature; default: serving_default.")
_INPUT = flags.DEFINE_string("input", None, "A .json or .npz file of inputs to Predict.")
_METADATA = flags.DEFINE_bool("metadata", False, "Print the model's signatures.")
_STATUS = flags.DEFINE_bool("status", False, "Print the model's version states.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
_TIMEOUT = flags.DEFINE_float("timeout_seconds", 30.0, "Deadline of each RPC.")


class ClientError(Exception):
  """A bad input file or request, or an error answered by the server."""


def _model_spec(message, model: str, version: int | None, label: str, signature: str = ""):
  message.model_spec.name = model
  if version is not None:
    message.model_spec.version.value = version
  elif label:
    message.model_spec.version_label = label
  if signature:
    message.model_spec.signature_name = signature


def _call(method, request, timeout: float, server: str):
  try:
    return method(request, timeout=timeout)
  except grpc.RpcError as e:
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
      raise ClientError(f"cannot reach a model server at {server}: {e.details()}") from e
    raise ClientError(f"server answered {e.code().name}: {e.details()}") from e


def signatures(channel, model, version, label, timeout, server) -> dict:
  """{signature name: SignatureDef} from GetModelMetadata."""
  from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    prediction_service_pb2_grpc,
  )

  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
  _model_spec(request, model, version, label)
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  response = _call(stub.GetModelMetadata, request, timeout, server)
  signature_defs = get_model_metadata_pb2.SignatureDefMap()
  response.metadata["signature_def"].Unpack(signature_defs)
  return dict(signature_defs.signature_def)


def read_inputs(path: str, signature_def) -> dict[str, np.ndarray]:
  """Named arrays from a JSON or .npz file, cast to the signature's dtypes."""
  import tensorflow as tf

  names = sorted(signature_def.inputs)
  try:
    if path.endswith(".npz"):
      with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
      if list(data) == ["arr_0"] and len(names) == 1:
        data = {names[0]: data["arr_0"]}
    else:
      with open(path) as f:
        data = json.load(f)
      if isinstance(data, dict):
        data = data.get("inputs", data.get("instances", data))
      if isinstance(data, list) and data and all(isinstance(row, dict) for row in data):
        data = {k: [row[k] for row in data] for k in data[0]}
      if not isinstance(data, dict):
        if len(names) != 1:
          raise ClientError(f"{path}: the signature takes inputs {names}; name them in a dict")
        data = {names[0]: data}
  except (OSError, ValueError, KeyError) as e:
    raise ClientError(f"cannot read inputs from {path}: {e}") from e
  arrays = {}
  for name, value in data.items():
    if name not in signature_def.inputs:
      raise ClientError(f"{path}: input {name!r} is not one of the signature's inputs {names}")
    dtype = tf.as_dtype(signature_def.inputs[name].dtype).as_numpy_dtype
    try:
      arrays[name] = np.asarray(value).astype(dtype)
    except (ValueError, TypeError) as e:
      raise ClientError(f"{path}: input {name!r} is not a rectangular numeric array: {e}") from e
  return arrays


def predict(channel, inputs, model, version, label, signature, timeout, server):
  """Returns (served version, {output name: array})."""
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

  request = predict_pb2.PredictRequest()
  _model_spec(request, model, version, label, signature)
  for name, value in inputs.items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  response = _call(stub.Predict, request, timeout, server)
  outputs = {name: tf.make_ndarray(proto) for name, proto in sorted(response.outputs.items())}
  return response.model_spec.version.value, outputs


def status(channel, model, version, label, timeout, server) -> list[dict]:
  from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

  request = get_model_status_pb2.GetModelStatusRequest()
  _model_spec(request, model, version, label)
  stub = model_service_pb2_grpc.ModelServiceStub(channel)
  response = _call(stub.GetModelStatus, request, timeout, server)
  states = get_model_status_pb2.ModelVersionStatus.State
  return [
    {
      "version": s.version,
      "state": states.Name(s.state),
      "error": s.status.error_message,
    }
    for s in response.model_version_status
  ]


def _format_values(row: np.ndarray, limit: int = 10) -> str:
  flat = np.asarray(row).reshape(-1)
  text = " ".join(
    f"{v:.4g}" if isinstance(v, float | np.floating) else str(v) for v in flat[:limit]
  )
  return text + (f" ... ({flat.size} values)" if flat.size > limit else "")


def _print_predictions(version: int, outputs: dict[str, np.ndarray]) -> None:
  print(f"version {version}")
  batch = min((len(v) for v in outputs.values() if v.ndim), default=0)
  names = list(outputs)
  print("row  " + "  ".join(names))
  for i in range(batch):
    print(f"{i:<4} " + "  ".join(_format_values(outputs[n][i]) for n in names))


def _signature_summary(signature_defs) -> dict:
  import tensorflow as tf

  def describe(infos):
    return {
      name: {
        "dtype": tf.as_dtype(info.dtype).name,
        "shape": None
        if info.tensor_shape.unknown_rank
        else [d.size for d in info.tensor_shape.dim],
      }
      for name, info in sorted(infos.items())
    }

  return {
    name: {"inputs": describe(d.inputs), "outputs": describe(d.outputs)}
    for name, d in sorted(signature_defs.items())
    if not name.startswith("__")
  }


def run() -> None:
  """Does what the flags ask; raises ClientError."""
  if not _MODEL.value:
    raise ClientError("--model is required")
  server, model, version, label = _SERVER.value, _MODEL.value, _VERSION.value, _VERSION_LABEL.value
  timeout = _TIMEOUT.value
  with grpc.insecure_channel(server) as channel:
    if _STATUS.value:
      result = status(channel, model, version, label, timeout, server)
      if _JSON.value:
        print(json.dumps(result, indent=2))
      else:
        for s in result:
          print(
            f"version {s['version']}: {s['state']}" + (f" ({s['error']})" if s["error"] else "")
          )
      return
    signature_defs = signatures(channel, model, version, label, timeout, server)
    if _METADATA.value or not _INPUT.value:
      summary = _signature_summary(signature_defs)
      if _JSON.value:
        print(json.dumps(summary, indent=2))
      else:
        for name, s in summary.items():
          for kind in ("inputs", "outputs"):
            for tensor, spec in s[kind].items():
              print(f"{name}  {kind[:-1]:6}  {tensor}  {spec['dtype']}  {spec['shape']}")
      return
    signature_name = _SIGNATURE.value or "serving_default"
    if signature_name not in signature_defs:
      raise ClientError(f"the model has no signature {signature_name!r}: {sorted(signature_defs)}")
    inputs = read_inputs(_INPUT.value, signature_defs[signature_name])
    served, outputs = predict(
      channel, inputs, model, version, label, signature_name, timeout, server
    )
  if _JSON.value:
    print(json.dumps({"version": served, "outputs": {k: v.tolist() for k, v in outputs.items()}}))
  else:
    _print_predictions(served, outputs)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run()
  except ClientError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
