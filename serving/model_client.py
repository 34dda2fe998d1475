"""A gRPC client of one served model (this project's server or `tensorflow_model_server`), with
numpy in and out and no TensorFlow runtime: it starts in well under a second.

  with ModelClient(Connection("localhost:8500", "digits")) as client:
    version, outputs = client.predict({"inputs": pixels})

Used by the `python -m serving.client` command line. Every method raises ClientError: for an
unreachable server, an error the server answered, or inputs that do not fit the signature.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np

from serving import contract
from serving.api_protos import (
  get_model_metadata_pb2,
  get_model_status_pb2,
  model_service_pb2_grpc,
  predict_pb2,
  prediction_service_pb2_grpc,
  types_pb2,
)
from serving.server import tensors

DEFAULT_SIGNATURE = contract.DEFAULT_SIGNATURE
# tensorflow.DataType -> numpy dtype, beyond the numeric ones whose bytes are their values.
_NUMPY_DTYPES = {enum: dtype for dtype, enum in tensors.NUMERIC_DTYPES.items()}
_NUMPY_DTYPES.update({types_pb2.DT_BOOL: np.dtype(bool), types_pb2.DT_STRING: np.dtype(object)})
# The TensorProto field that holds values of each dtype when they are not in tensor_content.
_VALUE_FIELDS = {
  types_pb2.DT_FLOAT: "float_val",
  types_pb2.DT_DOUBLE: "double_val",
  types_pb2.DT_INT32: "int_val",
  types_pb2.DT_INT16: "int_val",
  types_pb2.DT_INT8: "int_val",
  types_pb2.DT_UINT8: "int_val",
  types_pb2.DT_UINT16: "int_val",
  types_pb2.DT_INT64: "int64_val",
  types_pb2.DT_UINT32: "uint32_val",
  types_pb2.DT_UINT64: "uint64_val",
  types_pb2.DT_BOOL: "bool_val",
  types_pb2.DT_STRING: "string_val",
}


class ClientError(Exception):
  """A bad input or request, an unreachable server, or an error answered by the server."""


@dataclasses.dataclass(frozen=True)
class Connection:
  """Where requests go: a server's gRPC address, a model, which of its versions (a number, a
  label, or None and "" for the latest), and the deadline of each RPC."""

  server: str = "localhost:8500"
  model: str = ""
  version: int | None = None
  version_label: str = ""
  timeout_seconds: float = 30.0

  def __post_init__(self):
    if not self.model:
      raise ClientError("a model name is required (--model)")
    if self.version is not None and self.version_label:
      raise ClientError(
        f"give a version ({self.version}) or a version label ({self.version_label!r}), not both"
      )

  def fill_model_spec(self, request, signature_name: str = "") -> None:
    """Names the model (and version or label, and signature) in a request's model_spec."""
    request.model_spec.name = self.model
    if self.version is not None:
      request.model_spec.version.value = self.version
    elif self.version_label:
      request.model_spec.version_label = self.version_label
    if signature_name:
      request.model_spec.signature_name = signature_name


def dtype_name(enum: int) -> str:
  """TensorFlow's name of a tensorflow.DataType: float32, int32, string, bool, ..."""
  dtype = _NUMPY_DTYPES.get(enum)
  if dtype is not None and dtype != np.dtype(object):
    return dtype.name
  return types_pb2.DataType.Name(enum).removeprefix("DT_").lower()


def numpy_dtype(enum: int) -> np.dtype:
  """The numpy dtype of a tensorflow.DataType. Raises ClientError for one numpy lacks."""
  if enum not in _NUMPY_DTYPES:
    raise ClientError(f"tensors of dtype {dtype_name(enum)} are not supported by this client")
  return _NUMPY_DTYPES[enum]


def to_tensor_proto(value: np.ndarray, proto) -> None:
  """Writes `value` (numeric, bool, or bytes/str as object or string arrays) into an empty
  TensorProto, as tf.make_tensor_proto would."""
  value = np.asarray(value)
  if value.dtype.kind in "OSU":
    proto.dtype = types_pb2.DT_STRING
    for size in value.shape:
      proto.tensor_shape.dim.add(size=size)
    proto.string_val.extend(v.encode() if isinstance(v, str) else bytes(v) for v in value.flat)
  elif value.dtype == np.dtype(bool):
    proto.dtype = types_pb2.DT_BOOL
    for size in value.shape:
      proto.tensor_shape.dim.add(size=size)
    proto.bool_val.extend(value.ravel().tolist())
  elif value.dtype in tensors.NUMERIC_DTYPES:
    tensors.fill_tensor_proto(proto, value)
  else:
    raise ClientError(f"cannot send an array of dtype {value.dtype}")


def from_tensor_proto(proto) -> np.ndarray:
  """The array a TensorProto holds, from tensor_content or the typed value fields (where a
  shorter list repeats its last value, as TensorFlow writes constant tensors)."""
  dtype = numpy_dtype(proto.dtype)
  if proto.tensor_content and dtype in tensors.NUMERIC_DTYPES:
    return tensors.to_ndarray(proto)
  shape = [d.size for d in proto.tensor_shape.dim]
  count = int(np.prod(shape))
  field = _VALUE_FIELDS.get(proto.dtype)
  if field is None:
    raise ClientError(f"cannot read a {dtype_name(proto.dtype)} tensor without tensor_content")
  values = list(getattr(proto, field))
  if 0 < len(values) < count:
    values += [values[-1]] * (count - len(values))
  if len(values) != count:
    raise ClientError(f"a tensor of shape {shape} holds {len(values)} values")
  return np.array(values, dtype=dtype).reshape(shape)


class ModelClient:
  """gRPC calls to the model a Connection names. A context manager: the channel closes on
  exit. Not for use from several threads at once."""

  def __init__(self, connection: Connection):
    self.connection = connection
    self._channel = grpc.insecure_channel(connection.server)
    self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
    self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

  def __enter__(self) -> ModelClient:
    return self

  def __exit__(self, *exc_info) -> None:
    self._channel.close()

  def _call(self, method, request):
    try:
      return method(request, timeout=self.connection.timeout_seconds)
    except grpc.RpcError as e:
      if e.code() == grpc.StatusCode.UNAVAILABLE:
        raise ClientError(
          f"cannot reach a model server at {self.connection.server}: {e.details()}"
        ) from e
      if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise ClientError(
          f"no answer from {self.connection.server} within {self.connection.timeout_seconds:g} s "
          "(a first request of a new shape compiles the model); raise --timeout_seconds"
        ) from e
      raise ClientError(f"server answered {e.code().name}: {e.details()}") from e

  def signatures(self) -> dict:
    """{signature name: SignatureDef} from GetModelMetadata."""
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    self.connection.fill_model_spec(request)
    response = self._call(self._predictions.GetModelMetadata, request)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_defs)
    return dict(signature_defs.signature_def)

  def predict(
    self, inputs: dict[str, np.ndarray], signature_name: str = DEFAULT_SIGNATURE
  ) -> tuple[int, dict[str, np.ndarray]]:
    """(the version that answered, {output name: array}) of one Predict."""
    request = predict_pb2.PredictRequest()
    self.connection.fill_model_spec(request, signature_name)
    for name, value in inputs.items():
      to_tensor_proto(value, request.inputs[name])
    response = self._call(self._predictions.Predict, request)
    outputs = {name: from_tensor_proto(p) for name, p in sorted(response.outputs.items())}
    return response.model_spec.version.value, outputs

  def status(self) -> list[dict]:
    """[{"version", "state", "error"}] of the model's versions, from GetModelStatus."""
    request = get_model_status_pb2.GetModelStatusRequest()
    self.connection.fill_model_spec(request)
    response = self._call(self._models.GetModelStatus, request)
    states = get_model_status_pb2.ModelVersionStatus.State
    return [
      {"version": s.version, "state": states.Name(s.state), "error": s.status.error_message}
      for s in response.model_version_status
    ]
