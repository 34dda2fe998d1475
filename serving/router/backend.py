"""The router's handlers: RequestHandlers' interface (serving/server/handlers.py) answered by
forwarding to a TF-Serving-compatible backend over gRPC, so the server's transports
(grpc_api, rest_api) and its one request path (`RequestPath.serve`: request id, traffic split,
prediction log, shadow copy, metrics) run unchanged in front of it.

A routed request (Predict, Classify, Regress naming neither a version nor a label) is forwarded
with `model_spec.version_label` set to the arm the split chose (`RequestContext.route`, as the
server routes); any other request goes as it came. The backend's answer is returned as it is;
its error status (UNAVAILABLE when it is down) is the request's.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import grpc
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  model_service_pb2_grpc,
  predict_pb2,
  prediction_service_pb2_grpc,
  regression_pb2,
)

from serving.server import classify_regress, feedback, request_context, shadow, tensors, traffic
from serving.server.errors import ServingError
from serving.server.handlers import Metadata, ModelSpec, Prediction, Result, Served
from serving.server.loaded_version import SignatureInfo, signature_info
from serving.server.model_config import ModelConfig
from serving.server.model_versions import VersionStatus
from serving.server.request_context import RequestContext

_STATES = get_model_status_pb2.ModelVersionStatus.State
# How long a model's signatures (for decoding REST JSON) are reused before asking again.
_SIGNATURE_TTL_SECONDS = 10.0


@dataclasses.dataclass
class RouterModels:
  """What the router knows of the backend's models: the ModelConfigs of --model_config_file
  (labels and logging_config; base paths unused), empty without one. Stands in for
  ServedModels where the request path and the traffic policy read `configs`."""

  configs: dict[str, ModelConfig] = dataclasses.field(default_factory=dict)


class Backend:
  """gRPC stubs of one backend (`host:port`); `call` forwards a request with the request id in
  its metadata and maps a failed call to ServingError. Thread-safe (one shared channel)."""

  def __init__(self, address: str, timeout_seconds: float):
    self.address = address
    self.timeout_seconds = timeout_seconds
    self.channel = grpc.insecure_channel(address)
    self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
    self.model = model_service_pb2_grpc.ModelServiceStub(self.channel)

  def call(self, rpc, request, request_id: str, deadline: float | None = None):
    """`rpc(request)` on the backend; raises ServingError with the backend's status code.

    `deadline` (a `time.monotonic()` instant: the client's own deadline) shortens the call's
    timeout to what the client has left; one already past fails DEADLINE_EXCEEDED unsent."""
    timeout = self.timeout_seconds
    if deadline is not None:
      timeout = min(timeout, deadline - time.monotonic())
      if timeout <= 0:
        raise ServingError(
          grpc.StatusCode.DEADLINE_EXCEEDED, "the client's deadline passed before forwarding"
        )
    try:
      return rpc(
        request,
        timeout=timeout,
        metadata=[(request_context.REQUEST_ID_HEADER, request_id)] if request_id else None,
      )
    except grpc.RpcError as e:
      raise ServingError(e.code(), f"backend {self.address}: {e.details()}") from e

  def close(self) -> None:
    self.channel.close()


def _fill_spec(model_spec, spec: ModelSpec, label: str) -> None:
  model_spec.name = spec.name
  if spec.version is not None:
    model_spec.version.value = spec.version
  elif label:
    model_spec.version_label = label
  model_spec.signature_name = spec.signature_name


def _served(model_spec) -> Served:
  return Served(model_spec.name, model_spec.version.value, model_spec.signature_name)


class RouterHandlers:
  """RequestHandlers' methods (predict, classify, regress, multi_inference, metadata, status,
  record_feedback, reload) on a Backend. Each raises ServingError with the status the backend (or, for what the
  router refuses, TF Serving) answers. Thread-safe."""

  def __init__(self, backend: Backend, models: RouterModels):
    self.backend = backend
    self.models = models
    self.context: RequestContext | None = None
    self._signatures: dict[tuple, tuple[float, dict[str, SignatureInfo]]] = {}
    self._lock = threading.Lock()

  def with_context(self, context: RequestContext) -> RouterHandlers:
    """These handlers bound to one request (as RequestHandlers.with_context)."""
    return request_context.bind(self, context)  # Shares the backend and the signature cache.

  def _route(self, spec: ModelSpec) -> str:
    if self.context is None:
      return spec.label
    return self.context.route(spec.version, spec.label)

  def _forward(self, rpc, request):
    """`rpc(request)` on the backend with this request's id and the client's deadline."""
    context = self.context
    if context is None:
      return self.backend.call(rpc, request, "")
    return self.backend.call(rpc, request, context.request_id, context.deadline)

  def predict(self, spec: ModelSpec, inputs, output_filter=()) -> Prediction:
    """Forwards a Predict. `inputs`: arrays by name, or a function of the signature that
    decodes them (REST), given the signature from the backend's metadata."""
    label = self._route(spec)
    if callable(inputs):
      inputs = inputs(self._signature(spec, label))
    request = predict_pb2.PredictRequest()
    _fill_spec(request.model_spec, spec, label)
    request.output_filter.extend(output_filter)
    for name, value in inputs.items():
      tensors.fill_tensor_proto(request.inputs[name], value)
    response = self._forward(self.backend.prediction.Predict, request)
    outputs = {name: tensors.to_ndarray(proto) for name, proto in response.outputs.items()}
    served = _served(response.model_spec)
    if self.context is not None:
      context = self.context
      context.version = served.version
      context.signature_name = served.signature_name or spec.signature_name
      context.inputs, context.outputs = inputs, outputs
    return Prediction(served, outputs)

  def classify(self, spec: ModelSpec, examples) -> Result:
    """Forwards a Classify; `examples` an input_pb2.Input, or REST JSON (see _examples)."""
    request = classification_pb2.ClassificationRequest()
    _fill_spec(request.model_spec, spec, self._route(spec))
    request.input.CopyFrom(_examples(examples))
    response = self._forward(self.backend.prediction.Classify, request)
    return self._result(spec, request, response)

  def regress(self, spec: ModelSpec, examples) -> Result:
    """Forwards a Regress; `examples` an input_pb2.Input, or REST JSON (see _examples)."""
    request = regression_pb2.RegressionRequest()
    _fill_spec(request.model_spec, spec, self._route(spec))
    request.input.CopyFrom(_examples(examples))
    response = self._forward(self.backend.prediction.Regress, request)
    return self._result(spec, request, response)

  def _result(self, spec: ModelSpec, request, response) -> Result:
    """The Result of a forwarded Classify/Regress, recorded in the request's context as the
    signature's tensors (serialized Examples in, classes/scores or outputs out), as the server
    records them, when the log or a mirror may read them."""
    served = _served(response.model_spec)
    context = self.context
    if context is not None:
      context.version = served.version
      context.signature_name = served.signature_name or spec.signature_name
    if context is not None and context.wants_arrays:  # ~40 us a 3-example request: not free.
      examples = classify_regress.serialized_examples(request.input)
      context.inputs = {classify_regress.INPUTS: examples}
      context.outputs = classify_regress.result_tensors(response.result)
    return Result(served, response.result)

  def multi_inference(self, spec: ModelSpec, request) -> Result:
    """Forwards a MultiInference as it came (not split, as in the server)."""
    response = self._forward(self.backend.prediction.MultiInference, request)
    model_spec = response.results[0].model_spec
    return Result(Served(model_spec.name, model_spec.version.value, ""), response)

  def metadata(self, spec: ModelSpec, fields: list[str]) -> Metadata:
    """Forwards GetModelMetadata as asked (no split: metadata is of what was asked)."""
    response = self._metadata(spec, spec.label, fields)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    if "signature_def" in response.metadata:
      response.metadata["signature_def"].Unpack(signature_defs)
    return Metadata(_served(response.model_spec), signature_defs)

  def _metadata(self, spec: ModelSpec, label: str, fields):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    _fill_spec(request.model_spec, spec, label)
    request.model_spec.ClearField("signature_name")
    request.metadata_field.extend(fields)
    rpc = self.backend.prediction.GetModelMetadata
    return self._forward(rpc, request)

  def _signature(self, spec: ModelSpec, label: str) -> SignatureInfo:
    """The signature a REST request decodes against, from the backend's metadata of the
    version it is routed to (cached for a few seconds per model, version and label)."""
    key = (spec.name, spec.version, label)
    with self._lock:
      cached = self._signatures.get(key)
    if cached is None or time.monotonic() - cached[0] > _SIGNATURE_TTL_SECONDS:
      answer = self._metadata(spec, label, ["signature_def"])
      defs = get_model_metadata_pb2.SignatureDefMap()
      answer.metadata["signature_def"].Unpack(defs)
      infos = {name: signature_info(name, d) for name, d in defs.signature_def.items()}
      cached = (time.monotonic(), infos)
      with self._lock:
        self._signatures[key] = cached
    name = spec.signature_name or "serving_default"
    if name not in cached[1]:
      raise ServingError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f'Serving signature name: "{name}" not found in signature def; model {spec.name} '
        f"has {sorted(cached[1])}",
      )
    return cached[1][name]

  def status(self, spec: ModelSpec) -> list[VersionStatus]:
    """Forwards GetModelStatus as asked."""
    request = get_model_status_pb2.GetModelStatusRequest()
    _fill_spec(request.model_spec, spec, spec.label)
    request.model_spec.ClearField("signature_name")
    response = self._forward(self.backend.model.GetModelStatus, request)
    return [
      VersionStatus(s.version, _STATES.Name(s.state), s.status.error_message)
      for s in response.model_version_status
    ]

  def record_feedback(self, model_name: str, entry: dict) -> None:
    """Appends feedback next to the router's prediction log (as the server does)."""
    feedback.append(
      feedback.feedback_path(self.models.configs.get(model_name), model_name), [entry]
    )

  def check_reload_allowed(self) -> None:
    """A router serves no models of its own: reloads go to the backend."""
    raise ServingError(
      grpc.StatusCode.FAILED_PRECONDITION,
      "the router serves no models; send HandleReloadConfigRequest to the backend "
      f"({self.backend.address}) and point --model_config_file at the same file",
    )

  def reload(self, configs) -> None:
    self.check_reload_allowed()


def _examples(examples):
  """The Input proto of a Classify/Regress. REST JSON is converted by TF Serving's own rule (3
  an int64 feature, 3.0 a float one): the router cannot read the backend's parse spec, by which
  the server itself also takes JSON integers into float features."""
  return examples({}) if callable(examples) else examples


class BackendShadowRunner(shadow.ShadowRunner):
  """ShadowRunner whose copies are Predicts forwarded to the backend with the mirror's label; a
  Classify's or Regress's copy is a Predict of its signature on its serialized Examples (which
  TF Serving runs unless --enable_signature_method_name_check is set)."""

  def __init__(self, backend: Backend, metrics, logger, **kwargs):
    super().__init__(None, metrics, logger, **kwargs)
    self.backend = backend

  def run_copy(self, job: shadow.ShadowJob) -> tuple[int, str, dict]:
    request = predict_pb2.PredictRequest()
    spec = ModelSpec(job.model_name, None, job.label, job.signature_name)
    _fill_spec(request.model_spec, spec, job.label)
    for name, value in job.inputs.items():
      tensors.fill_tensor_proto(request.inputs[name], value)
    response = self.backend.call(self.backend.prediction.Predict, request, job.request_id)
    outputs = {name: tensors.to_ndarray(proto) for name, proto in response.outputs.items()}
    return response.model_spec.version.value, response.model_spec.signature_name, outputs


class RouterTrafficPolicy(traffic.TrafficPolicy):
  """The server's TrafficPolicy; without --model_config_file a config's labels are taken as
  the backend's (the backend answers a label it lacks with its own error)."""

  def apply(self, text, where, labels=None, *, count_refusal=True) -> None:
    if labels is None and not self.models.configs:
      labels = labels_named(text)
    super().apply(text, where, labels, count_refusal=count_refusal)


def labels_named(text: str) -> dict[str, set[str]]:
  """Model -> the labels a traffic config's text names (split arms and mirror); {} for text
  that is not a traffic config (traffic.parse then says what is wrong)."""
  try:
    models = json.loads(text).get("models")
  except (json.JSONDecodeError, AttributeError):
    return {}
  named = {}
  for name, entry in models.items() if isinstance(models, dict) else ():
    labels = named[name] = set()
    if not isinstance(entry, dict):
      continue
    split, mirror = entry.get("split"), entry.get("mirror")
    arms = split.get("arms") if isinstance(split, dict) else None
    for arm in arms if isinstance(arms, list) else ():
      if isinstance(arm, dict) and isinstance(arm.get("label"), str):
        labels.add(arm["label"])
    if isinstance(mirror, dict) and isinstance(mirror.get("label"), str):
      labels.add(mirror["label"])
  return named
