"""TF Serving's gRPC API: PredictionService (Predict, Classify, Regress, GetModelMetadata) and
ModelService (GetModelStatus, HandleReloadConfigRequest). MultiInference answers UNIMPLEMENTED."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import numpy as np
from absl import logging
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
  get_model_metadata_pb2,
  get_model_status_pb2,
  model_management_pb2,
  model_service_pb2_grpc,
  predict_pb2,
  prediction_service_pb2_grpc,
)

from serving.server import classify_regress, tensors
from serving.server.metrics import Metrics
from serving.server.model_manager import ServedModels, ServingError

# The services whose health the standard health service reports, besides the server's ("").
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
# tensorflow.error.Code of a version whose load failed.
_ERROR_UNKNOWN = 2


def _requested_version(model_spec) -> int | None:
  return model_spec.version.value if model_spec.HasField("version") else None


def _to_ndarray(name: str, proto) -> np.ndarray:
  try:
    return tensors.to_ndarray(proto)
  except Exception as e:  # A malformed TensorProto is the client's error, whatever TF raises.
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}' is not a valid TensorProto: {e}"
    ) from e


class _Handler:
  """Runs one RPC: maps ServingError to its status code, anything else to INTERNAL, and records
  metrics. A failure never outlives its request."""

  def __init__(self, manager: ServedModels, metrics: Metrics):
    self.manager = manager
    self.metrics = metrics

  def __call__(self, method: str, model_spec, context, fn):
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    message = ""
    version = _requested_version(model_spec)
    try:
      response, version = fn()
    except ServingError as e:
      code, message = e.code, e.message
    except Exception as e:
      logging.exception("%s failed", method)
      code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
    self.metrics.observe(
      "grpc", method, model_spec.name, version, code.name, time.perf_counter() - start
    )
    if code != grpc.StatusCode.OK:
      context.abort(code, message)
    return response


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  def __init__(self, handler: _Handler):
    self.handler = handler
    self.manager = handler.manager

  def _resolve(self, model_spec):
    return self.manager.resolve(
      model_spec.name, _requested_version(model_spec), model_spec.version_label
    )

  def Predict(self, request, context):
    def predict():

      served = self._resolve(request.model_spec)
      inputs = {name: _to_ndarray(name, proto) for name, proto in request.inputs.items()}
      signature = served.signature(request.model_spec.signature_name)
      outputs = served.run(signature.name, inputs, tuple(request.output_filter))
      response = predict_pb2.PredictResponse()
      response.model_spec.name = served.model_name
      response.model_spec.version.value = served.version
      response.model_spec.signature_name = signature.name
      for name, value in outputs.items():
        tensors.fill_tensor_proto(response.outputs[name], value)
      return response, served.version

    return self.handler("Predict", request.model_spec, context, predict)

  def Classify(self, request, context):
    def classify():
      classify_regress.check_model_spec(request)
      served = self._resolve(request.model_spec)
      return classify_regress.classify(served, request), served.version

    return self.handler("Classify", request.model_spec, context, classify)

  def Regress(self, request, context):
    def regress():
      classify_regress.check_model_spec(request)
      served = self._resolve(request.model_spec)
      return classify_regress.regress(served, request), served.version

    return self.handler("Regress", request.model_spec, context, regress)

  def GetModelMetadata(self, request, context):
    def metadata():
      unsupported = [f for f in request.metadata_field if f != "signature_def"]
      if unsupported or not request.metadata_field:
        raise ServingError(
          grpc.StatusCode.INVALID_ARGUMENT,
          f"Metadata field {unsupported[0] if unsupported else '(none)'} is not supported; "
          "request metadata_field 'signature_def'",
        )
      served = self._resolve(request.model_spec)
      signature_defs = get_model_metadata_pb2.SignatureDefMap()
      for name, signature_def in served.signature_defs.items():
        signature_defs.signature_def[name].CopyFrom(signature_def)
      response = get_model_metadata_pb2.GetModelMetadataResponse()
      response.model_spec.name = served.model_name
      response.model_spec.version.value = served.version
      response.metadata["signature_def"].Pack(signature_defs)
      return response, served.version

    return self.handler("GetModelMetadata", request.model_spec, context, metadata)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
  def __init__(self, handler: _Handler):
    self.handler = handler
    self.manager = handler.manager

  def GetModelStatus(self, request, context):
    def status():
      spec = request.model_spec
      response = get_model_status_pb2.GetModelStatusResponse()
      states = get_model_status_pb2.ModelVersionStatus.State
      for s in self.manager.status(spec.name, _requested_version(spec), spec.version_label):
        entry = response.model_version_status.add(version=s.version, state=states.Value(s.state))
        if s.error:
          entry.status.error_code = _ERROR_UNKNOWN
          entry.status.error_message = s.error
      return response, _requested_version(spec)

    return self.handler("GetModelStatus", request.model_spec, context, status)

  def HandleReloadConfigRequest(self, request, context):
    """Serves exactly the request's ModelServerConfig (see ServedModels.reload); answers when
    the new models are loaded. A failure is the RPC's status and the response's."""
    from serving.server import model_config

    start = time.perf_counter()
    response = model_management_pb2.ReloadConfigResponse()
    code, message = grpc.StatusCode.OK, ""
    try:
      try:
        configs = model_config.from_proto(request.config, "the ReloadConfigRequest's config")
      except ValueError as e:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
      self.manager.reload(configs)
    except ServingError as e:
      code, message = e.code, e.message
    except Exception as e:
      logging.exception("HandleReloadConfigRequest failed")
      code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
    self.handler.metrics.observe(
      "grpc", "HandleReloadConfigRequest", "", None, code.name, time.perf_counter() - start
    )
    response.status.error_code = code.value[0]
    response.status.error_message = message
    if code != grpc.StatusCode.OK:
      logging.error("HandleReloadConfigRequest failed: %s", message)
      context.abort(code, message)
    logging.info("Reloaded the model config: %s", sorted(self.manager.managers))
    return response


def build(
  manager: ServedModels,
  metrics: Metrics,
  address: str,
  *,
  max_request_size_bytes: int,
  max_threads: int,
) -> tuple[grpc.Server, int, health.HealthServicer]:
  """A started gRPC server on `address` ("host:port"); returns it, the bound port (0 if it could
  not bind) and its health service (grpc.health.v1: SERVING for "" and both TF Serving
  services once started; `enter_graceful_shutdown()` turns them NOT_SERVING)."""
  server = grpc.server(
    futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc"),
    options=[
      ("grpc.max_receive_message_length", max_request_size_bytes),
      ("grpc.max_send_message_length", -1),
    ],
  )
  handler = _Handler(manager, metrics)
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
    PredictionServicer(handler), server
  )
  model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(handler), server)
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
