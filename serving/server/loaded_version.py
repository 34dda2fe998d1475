"""One loaded SavedModel version: its signatures, input checks, runs, and warmup replay.

Thread-safe: `run` may be called from many threads at once. Errors a request can cause are
ServingError with TF Serving's status code; anything else is a bug (or a broken SavedModel).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import grpc
import numpy as np

from serving import contract
from serving.server import example_features, tensors
from serving.server.batching import BatchScheduler
from serving.server.errors import ServingError, check_deadline


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  dtype: int  # tensorflow.DataType enum
  # None for an unknown rank; -1 for an unknown dimension.
  shape: tuple[int, ...] | None

  def describe(self) -> str:
    return contract.describe_shape(self.shape)


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
  name: str
  inputs: dict[str, TensorSpec]
  outputs: dict[str, TensorSpec]

  @property
  def batchable(self) -> bool:
    """Whether every input and output leads with a batch dimension of any size."""
    specs = [*self.inputs.values(), *self.outputs.values()]
    return all(s.shape is not None and s.shape[:1] == (-1,) for s in specs)


class LoadedVersion:
  """One loaded SavedModel version. Built by ModelVersions when it loads a version (blocking:
  reads the SavedModel); raises whatever TensorFlow raises for a broken one."""

  def __init__(
    self, model_name: str, version: int, path: str, batch_scheduler: BatchScheduler | None = None
  ):
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    self.model_name = model_name
    self.version = version
    self.path = path
    self._tf = tf
    self._batch_scheduler = batch_scheduler
    self._loaded = tf.saved_model.load(path, tags=[contract.SERVE_TAG])
    with open(os.path.join(path, contract.SAVED_MODEL_FILE), "rb") as f:
      saved_model = saved_model_pb2.SavedModel.FromString(f.read())
    meta_graph = next(
      (m for m in saved_model.meta_graphs if contract.SERVE_TAG in m.meta_info_def.tags),
      saved_model.meta_graphs[0],
    )
    # All SignatureDefs (with __saved_model_init_op), as TF Serving's GetModelMetadata returns them.
    self.signature_defs = dict(meta_graph.signature_def)
    self.signatures = {
      name: signature_info(name, d)
      for name, d in self.signature_defs.items()
      if name in self._loaded.signatures
    }
    # Signature name -> {feature: tf.Example kind} its graph parses (Classify/Regress inputs).
    self.example_features = {
      name: example_features.parsed_features(self._loaded.signatures[name].graph)
      for name, d in self.signature_defs.items()
      if name in self.signatures
      and d.method_name in (contract.CLASSIFY_METHOD_NAME, contract.REGRESS_METHOD_NAME)
    }

  def signature(self, name: str) -> SignatureInfo:
    """The signature `name` (empty: serving_default). Raises ServingError FAILED_PRECONDITION."""
    name = contract.resolve_signature_name(name)
    if name not in self.signatures:
      raise ServingError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f'Serving signature name: "{name}" not found in signature def; model {self.model_name} '
        f"version {self.version} has {sorted(self.signatures)}",
      )
    return self.signatures[name]

  def run(
    self,
    signature_name: str,
    inputs: dict[str, np.ndarray],
    output_filter=(),
    deadline: float | None = None,
  ) -> dict[str, np.ndarray]:
    """Validates `inputs` against the signature and runs it (batched with other requests when
    the server batches), unless `deadline` (time.monotonic()) passes before it starts. Raises
    ServingError (DEADLINE_EXCEEDED for the deadline)."""
    signature = self.signature(signature_name)
    check_inputs(signature, inputs)
    unknown = sorted(set(output_filter) - set(signature.outputs))
    if unknown:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"output tensor alias not found in signature: {', '.join(unknown)}; "
        f"signature {signature.name} has outputs {sorted(signature.outputs)}",
      )
    execute = functools.partial(self._execute, signature.name)
    if self._batch_scheduler is not None and signature.batchable:
      outputs = self._batch_scheduler.run(self, signature.name, inputs, execute, deadline)
    else:
      check_deadline(deadline, "its model ran")
      outputs = execute(inputs)
    if output_filter:
      return {k: v for k, v in outputs.items() if k in output_filter}
    return outputs

  def _execute(self, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tf = self._tf
    function = self._loaded.signatures[signature_name]
    try:
      result = function(**{k: tf.constant(v) for k, v in inputs.items()})
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
      message = str(e).strip()
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        example_features.explain_parse_error(message) or message,
      ) from e
    return {k: v.numpy() for k, v in result.items()}

  def warm_up(self, iterations: int = 1) -> int:
    """Replays `assets.extra/tf_serving_warmup_requests` (Predict logs), each `iterations`
    times; returns how many records there were. Raises ValueError for a record that is not a
    PredictLog, ServingError for one that fails.

    With batching, the first record of each batchable signature also runs at every batch size
    the scheduler pads to (its rows repeated), so no request waits for a compile."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = contract.warmup_path(self.path)
    if not os.path.exists(path):
      return 0
    count = 0
    warm = set()  # Signatures run at every batch size.
    dataset = self._tf.data.TFRecordDataset(path).take(contract.MAX_WARMUP_RECORDS)
    for record in dataset:
      log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
      if log.WhichOneof("log_type") != "predict_log":
        raise ValueError(f"warmup record {count} is not a PredictLog; only Predict is supported")
      request = log.predict_log.request
      inputs = {k: self._tf.make_ndarray(v) for k, v in request.inputs.items()}
      for _ in range(iterations):
        self.run(request.model_spec.signature_name, inputs, tuple(request.output_filter))
      signature = self.signature(request.model_spec.signature_name)
      if self._batch_scheduler is not None and signature.batchable and signature.name not in warm:
        warm.add(signature.name)
        for size in self._batch_scheduler.options.batch_sizes:
          self._execute(signature.name, {k: _resize_rows(v, size) for k, v in inputs.items()})
      count += 1
    return count


def _resize_rows(value: np.ndarray, rows: int) -> np.ndarray:
  """`value`'s rows repeated (or cut) to `rows` rows."""
  return np.resize(value, (rows, *value.shape[1:]))


def signature_info(name: str, signature_def) -> SignatureInfo:
  """The SignatureInfo of a SignatureDef proto (the router builds them from a backend's
  GetModelMetadata)."""
  return SignatureInfo(name, _specs(signature_def.inputs), _specs(signature_def.outputs))


def _specs(tensor_infos) -> dict[str, TensorSpec]:
  return {
    name: TensorSpec(
      info.dtype,
      None if info.tensor_shape.unknown_rank else tuple(d.size for d in info.tensor_shape.dim),
    )
    for name, info in tensor_infos.items()
  }


def check_inputs(signature: SignatureInfo, inputs: dict[str, np.ndarray]) -> None:
  """Raises ServingError (INVALID_ARGUMENT) unless `inputs` are exactly the signature's inputs,
  each of its dtype and shape."""
  missing = [name for name in signature.inputs if name not in inputs]
  extra = [name for name in inputs if name not in signature.inputs]
  if missing or extra:
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      f"signature {signature.name} takes inputs {sorted(signature.inputs)}; "
      + (f"missing {sorted(missing)}" if missing else "")
      + ("; " if missing and extra else "")
      + (f"unexpected {sorted(extra)}" if extra else ""),
    )
  for name, value in inputs.items():
    spec = signature.inputs[name]
    dtype = tensors.datatype_enum(value.dtype)
    if dtype != spec.dtype:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input '{name}' has dtype {tensors.dtype_name(dtype) if dtype else value.dtype} but "
        f"signature {signature.name} expects {tensors.dtype_name(spec.dtype)}",
      )
    shape = spec.shape
    if shape is not None and (
      value.ndim != len(shape)
      or any(d != -1 and d != n for d, n in zip(shape, value.shape, strict=True))
    ):
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input '{name}' has shape {list(value.shape)} but signature {signature.name} expects "
        f"{spec.describe()} (-1: any size)",
      )
