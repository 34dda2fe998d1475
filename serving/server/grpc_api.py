"""TF Serving's gRPC API: PredictionService (Predict, Classify, Regress, MultiInference,
GetModelMetadata) and ModelService (GetModelStatus, HandleReloadConfigRequest).

A thin transport: each RPC decodes its request into a ModelSpec and arrays, hands the work to
the one request path (handlers.RequestPath) and encodes the Outcome.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import numpy as np
from absl import logging
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  model_management_pb2,
  model_service_pb2_grpc,
  predict_pb2,
  prediction_service_pb2_grpc,
  regression_pb2,
)

from serving.server import classify_regress, model_config, request_context, tensors
from serving.server.errors import ServingError
from serving.server.handlers import ModelSpec, Outcome, Reply, RequestPath

# The services whose health the standard health service reports, besides the server's ("").
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
# tensorflow.error.Code of a version whose load failed.
_ERROR_UNKNOWN = 2
_STATES = get_model_status_pb2.ModelVersionStatus.State


def _spec(model_spec) -> ModelSpec:
  version = model_spec.version.value if model_spec.HasField("version") else None
  return ModelSpec(model_spec.name, version, model_spec.version_label, model_spec.signature_name)


def _to_ndarray(name: str, proto) -> np.ndarray:
  try:
    return tensors.to_ndarray(proto)
  except Exception as e:  # A malformed TensorProto is the client's error, whatever TF raises.
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}' is not a valid TensorProto: {e}"
    ) from e


def _fill_model_spec(model_spec, served) -> None:
  model_spec.name = served.model_name
  model_spec.version.value = served.version
  if served.signature_name:
    model_spec.signature_name = served.signature_name


def _caller(context) -> dict:
  """`RequestPath.serve`'s `headers` (the call's metadata by lower-case key, binary `-bin`
  entries left out) and `deadline` (the client's, as a time.monotonic() instant, or None)."""
  headers = {m.key: m.value for m in context.invocation_metadata() if not m.key.endswith("-bin")}
  remaining = context.time_remaining()
  return {
    "headers": headers,
    "deadline": None if remaining is None else time.monotonic() + remaining,
  }


def _answer(outcome: Outcome, context):
  """The response, or the abort with its status; the request id and arm go in the trailing
  metadata (`x-request-id`, `x-arm`) either way."""
  trailing = [(request_context.REQUEST_ID_HEADER, outcome.request_id)]
  if outcome.arm is not None:
    trailing.append((request_context.ARM_HEADER, outcome.arm))
  context.set_trailing_metadata(trailing)
  if outcome.code != grpc.StatusCode.OK:
    context.abort(outcome.code, outcome.message)
  return outcome.value


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  def __init__(self, path: RequestPath):
    self.path = path

  def Predict(self, request, context):
    def predict(handlers):
      inputs = {name: _to_ndarray(name, proto) for name, proto in request.inputs.items()}
      prediction = handlers.predict(spec, inputs, tuple(request.output_filter))
      response = predict_pb2.PredictResponse()
      _fill_model_spec(response.model_spec, prediction.served)
      for name, value in prediction.outputs.items():
        tensors.fill_tensor_proto(response.outputs[name], value)
      return Reply(response, prediction.served)

    spec = _spec(request.model_spec)
    return _answer(self.path.serve("grpc", "Predict", spec, predict, **_caller(context)), context)

  def Classify(self, request, context):
    def classify(handlers):
      classify_regress.check_model_spec(request)
      answer = handlers.classify(spec, request.input)
      response = classification_pb2.ClassificationResponse(result=answer.result)
      _fill_model_spec(response.model_spec, answer.served)
      return Reply(response, answer.served)

    spec = _spec(request.model_spec)
    return _answer(self.path.serve("grpc", "Classify", spec, classify, **_caller(context)), context)

  def Regress(self, request, context):
    def regress(handlers):
      classify_regress.check_model_spec(request)
      answer = handlers.regress(spec, request.input)
      response = regression_pb2.RegressionResponse(result=answer.result)
      _fill_model_spec(response.model_spec, answer.served)
      return Reply(response, answer.served)

    spec = _spec(request.model_spec)
    return _answer(self.path.serve("grpc", "Regress", spec, regress, **_caller(context)), context)

  def MultiInference(self, request, context):
    def multi_inference(handlers):
      answer = handlers.multi_inference(spec, request)
      return Reply(answer.result, answer.served)

    # The first task's model_spec picks the version, as in TF Serving.
    spec = _spec(request.tasks[0].model_spec) if request.tasks else ModelSpec("")
    return _answer(
      self.path.serve("grpc", "MultiInference", spec, multi_inference, **_caller(context)), context
    )

  def GetModelMetadata(self, request, context):
    def metadata(handlers):
      answer = handlers.metadata(spec, list(request.metadata_field))
      response = get_model_metadata_pb2.GetModelMetadataResponse()
      _fill_model_spec(response.model_spec, answer.served)
      response.metadata["signature_def"].Pack(answer.signature_defs)
      return Reply(response, answer.served)

    spec = _spec(request.model_spec)
    return _answer(
      self.path.serve("grpc", "GetModelMetadata", spec, metadata, **_caller(context)), context
    )


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
  def __init__(self, path: RequestPath):
    self.path = path

  def GetModelStatus(self, request, context):
    def status(handlers):
      response = get_model_status_pb2.GetModelStatusResponse()
      for s in handlers.status(spec):
        entry = response.model_version_status.add(version=s.version, state=_STATES.Value(s.state))
        if s.error:
          entry.status.error_code = _ERROR_UNKNOWN
          entry.status.error_message = s.error
      return Reply(response)

    spec = _spec(request.model_spec)
    return _answer(
      self.path.serve("grpc", "GetModelStatus", spec, status, **_caller(context)), context
    )

  def HandleReloadConfigRequest(self, request, context):
    """Serves exactly the request's ModelServerConfig (RequestHandlers.reload); answers when
    the new models are loaded. A failure is the RPC's status and the response's."""

    def reload(handlers):
      handlers.check_reload_allowed()  # Before parsing: whatever the config, a worker refuses.
      try:
        configs = model_config.from_proto(request.config, "the ReloadConfigRequest's config")
      except ValueError as e:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
      handlers.reload(configs)
      return Reply(None)

    outcome = self.path.serve("grpc", "HandleReloadConfigRequest", ModelSpec(""), reload)
    response = model_management_pb2.ReloadConfigResponse()
    response.status.error_code = outcome.code.value[0]
    response.status.error_message = outcome.message
    if outcome.code != grpc.StatusCode.OK:
      logging.error("HandleReloadConfigRequest failed: %s", outcome.message)
    _answer(outcome, context)
    return response


def build(
  path: RequestPath,
  address: str,
  *,
  max_request_size_bytes: int,
  max_threads: int,
  reuse_port: bool = False,
  channel_arguments: list[tuple[str, int | str]] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
  """A started gRPC server on `address` ("host:port"); returns it, the bound port (0 if it could
  not bind) and its health service (grpc.health.v1: SERVING for "" and both TF Serving
  services once started; `enter_graceful_shutdown()` turns them NOT_SERVING). `reuse_port`:
  other processes may bind the same port (--num_workers); otherwise a taken port fails.
  `channel_arguments` (--grpc_channel_arguments) replace the server's options of their keys."""
  options = dict(
    [
      ("grpc.max_receive_message_length", max_request_size_bytes),
      ("grpc.max_send_message_length", -1),
      ("grpc.so_reuseport", 1 if reuse_port else 0),
      *channel_arguments,
    ]
  )
  server = grpc.server(
    futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc"),
    options=list(options.items()),
  )
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
    PredictionServicer(path), server
  )
  model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(path), server)
  health_servicer = health.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
  try:
    port = server.add_insecure_port(address)
  except RuntimeError:  # grpcio >= 1.60 raises where older versions returned 0.
    port = 0
  if port:
    server.start()
    for service in ("", *SERVICES):
      health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
  return server, port, health_servicer
