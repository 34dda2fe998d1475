"""The request path: protocol-free handlers behind one wrapper, `RequestPath.serve`.

Transports (grpc_api.py, rest_api.py) only decode a request into a ModelSpec and numpy arrays
or protos, call `RequestPath.serve(api, method, spec, work)` with a `work(handlers)` that does
the rest, and encode the Outcome. Nothing else reaches a model: `RequestPath.serve` is the one
place that sees every request and its outcome, and `RequestHandlers.resolve` the one place a
model spec becomes a loaded version.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from absl import logging

from serving.server import (
  classify_regress,
  feedback,
  log_format,
  multi_inference,
  request_context,
)
from serving.server.errors import ServingError
from serving.server.loaded_version import LoadedVersion, SignatureInfo
from serving.server.metrics import Metrics
from serving.server.model_config import ModelConfig
from serving.server.model_versions import VersionStatus
from serving.server.prediction_logger import LogEntry, PredictionLogger
from serving.server.request_context import RequestContext
from serving.server.served_models import ServedModels

R = TypeVar("R")
# Inputs of a Predict: arrays by name, or a function of the signature that decodes them (REST
# needs the signature's dtypes to read JSON).
Inputs = Mapping[str, np.ndarray] | Callable[[SignatureInfo], Mapping[str, np.ndarray]]
# Examples of a Classify/Regress: an input_pb2.Input, or a function of the features the
# signature parses ({name: "float_list" | "int64_list" | "bytes_list"}) that builds one.
ExamplesInput = Any


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
  """What a request asks for (TF Serving's ModelSpec): a version, a label, or the latest."""

  name: str
  version: int | None = None
  label: str = ""
  signature_name: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
  """What answered: the model, version and signature a response names."""

  model_name: str
  version: int
  signature_name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Prediction:
  served: Served
  outputs: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
  """A Classify/Regress answer: a ClassificationResult or RegressionResult proto (MultiInference:
  its MultiInferenceResponse)."""

  served: Served
  result: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Metadata:
  served: Served
  # tensorflow.serving.SignatureDefMap of every SignatureDef, as TF Serving answers.
  signature_defs: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Reply(Generic[R]):
  """What a transport's work returns: its encoded answer and what served it (for metrics and
  the hooks)."""

  value: R
  served: Served | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome(Generic[R]):
  """A request's end: OK and its value, or a status code and message (value None); its
  request id and traffic-split arm, which transports return as `x-request-id` and `x-arm`."""

  code: grpc.StatusCode
  message: str = ""
  value: R | None = None
  served: Served | None = None
  request_id: str = ""
  arm: str | None = None


class RequestHandlers:
  """Predict, Classify, Regress, MultiInference, GetModelMetadata, GetModelStatus and
  ReloadConfig on the served models, in numpy and TF Serving's messages, with no transport.
  Each raises ServingError with the status TF Serving answers. Thread-safe."""

  def __init__(
    self,
    models: ServedModels,
    base_path_roots: list[str] | None = None,
    *,
    reloads_allowed: bool = True,
  ):
    """`base_path_roots`: directories a reload's base paths must lie under (None: any).
    `reloads_allowed`: False in a worker of --num_workers, where a reload would change one
    worker's models only."""
    self.models = models
    self.reloads_allowed = reloads_allowed
    # The request's context in a copy bound to one request (`with_context`), else None.
    self.context: RequestContext | None = None
    self.base_path_roots = (
      None if base_path_roots is None else [os.path.realpath(r) for r in base_path_roots]
    )

  def with_context(self, context: RequestContext) -> RequestHandlers:
    """These handlers bound to one request: its split applies and its arrays are recorded."""
    return request_context.bind(self, context)

  def resolve(self, spec: ModelSpec) -> LoadedVersion:
    """The loaded version that serves `spec`: the one place requests meet versions. A spec
    naming neither version nor label takes the arm its context's traffic split picks."""
    context = self.context
    if context is None:
      return self.models.resolve(spec.name, spec.version, spec.label)
    label = context.route(spec.version, spec.label)
    loaded = self.models.resolve(spec.name, spec.version, label)
    context.version = loaded.version
    return loaded

  def predict(self, spec: ModelSpec, inputs: Inputs, output_filter=()) -> Prediction:
    served = self.resolve(spec)
    signature = served.signature(spec.signature_name)
    arrays = inputs(signature) if callable(inputs) else inputs
    outputs = self._run(served, signature, arrays, output_filter)
    return Prediction(Served(served.model_name, served.version, signature.name), outputs)

  def classify(self, spec: ModelSpec, examples: ExamplesInput) -> Result:
    return self._on_examples(
      spec,
      examples,
      classify_regress.classification_signature,
      classify_regress.classification_result,
    )

  def regress(self, spec: ModelSpec, examples: ExamplesInput) -> Result:
    return self._on_examples(
      spec, examples, classify_regress.regression_signature, classify_regress.regression_result
    )

  def _on_examples(self, spec: ModelSpec, examples: ExamplesInput, signature_of, result_of):
    """Classify or Regress: the signature `signature_of` finds, run on the serialized
    Examples, its outputs made a result by `result_of`."""
    served = self.resolve(spec)
    signature = signature_of(served, spec.signature_name)
    examples = classify_regress.serialized_examples(_examples(examples, served, signature))
    outputs = self._run(served, signature, {classify_regress.INPUTS: examples})
    result = result_of(outputs, len(examples))
    return Result(Served(served.model_name, served.version, signature.name), result)

  def multi_inference(self, spec: ModelSpec, request) -> Result:
    """MultiInference (serving/server/multi_inference.py) on the version `spec`, the first
    task's model_spec, asks for. Neither split, logged nor mirrored: those follow one signature."""
    tasks = multi_inference.tasks_of(request)
    served = self.resolve(spec)
    deadline = self.context.deadline if self.context is not None else None
    run = functools.partial(served.run, deadline=deadline)
    response = multi_inference.infer(served, tasks, request.input, run)
    return Result(Served(served.model_name, served.version, ""), response)

  def _run(self, served: LoadedVersion, signature: SignatureInfo, arrays, output_filter=()):
    """Runs `signature` and records what it took and gave in the request's context (for the
    prediction log and the shadow copy, which treat every RPC as a run of its signature)."""
    context = self.context
    if context is not None:
      context.signature_name, context.inputs = signature.name, arrays
    deadline = context.deadline if context is not None else None
    outputs = served.run(signature.name, arrays, output_filter, deadline)
    if context is not None:
      context.outputs = outputs
    return outputs

  def metadata(self, spec: ModelSpec, fields: list[str]) -> Metadata:
    """GetModelMetadata; only the `signature_def` field exists (INVALID_ARGUMENT otherwise)."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    unsupported = [f for f in fields if f != "signature_def"]
    if unsupported or not fields:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Metadata field {unsupported[0] if unsupported else '(none)'} is not supported; "
        "request metadata_field 'signature_def'",
      )
    served = self.resolve(spec)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    for name, signature_def in served.signature_defs.items():
      signature_defs.signature_def[name].CopyFrom(signature_def)
    return Metadata(Served(served.model_name, served.version, ""), signature_defs)

  def record_feedback(self, model_name: str, entry: dict) -> None:
    """Appends a checked feedback entry (feedback.parse_entry) next to the model's prediction
    log. Raises ServingError NOT_FOUND / FAILED_PRECONDITION (no logging_config)."""
    feedback.append(
      feedback.feedback_path(self.models.configs.get(model_name), model_name), [entry]
    )

  def status(self, spec: ModelSpec) -> list[VersionStatus]:
    return self.models.status(spec.name, spec.version, spec.label)

  def reload(self, configs: list[ModelConfig]) -> None:
    """Serves exactly `configs` (ServedModels.reload), once every base path lies under a root.
    Raises ServingError: INVALID_ARGUMENT for a base path outside the roots (nothing changes),
    FAILED_PRECONDITION in a worker of --num_workers."""
    self.check_reload_allowed()
    if self.base_path_roots is not None:
      for config in configs:
        self._check_under_roots(config)
    self.models.reload(configs)
    logging.info("Reloaded the model config: %s", sorted(self.models.models))

  def check_reload_allowed(self) -> None:
    """Raises ServingError FAILED_PRECONDITION in a worker of --num_workers."""
    if not self.reloads_allowed:
      raise ServingError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "with --num_workers > 1 a reload request would reach one worker only; change the "
        "--model_config_file (with --model_config_file_poll_wait_seconds) instead",
      )

  def _check_under_roots(self, config: ModelConfig) -> None:
    real = os.path.realpath(config.base_path)  # `..` and symlinks resolved.
    if not any(
      real == root or real.startswith(root.rstrip(os.sep) + os.sep)
      for root in (self.base_path_roots)
    ):
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"model {config.name!r}: base_path {config.base_path!r} (resolved: {real}) is not under "
        f"--model_base_path_roots {self.base_path_roots}; a reload may only serve models from "
        "there",
      )


def _examples(examples: ExamplesInput, served: LoadedVersion, signature: SignatureInfo):
  if callable(examples):
    return examples(served.example_features.get(signature.name, {}))
  return examples


# Methods the traffic split routes (the others read metadata and status of what was asked).
ROUTED_METHODS = frozenset({"Predict", "Classify", "Regress"})


class RequestPath:
  """The only way a request reaches a model: `serve` runs it on the handlers, maps a
  ServingError to its status code and anything else to INTERNAL (logged), and records the
  request in the metrics. A failure never outlives its request.

  Hooks, all here: the request id (`x-request-id`), the traffic split (through the request's
  context, applied in `RequestHandlers.resolve`), the prediction log and the shadow copy of a
  Predict, Classify or Regress (after it answered: neither ever delays or fails the request).
  """

  def __init__(
    self,
    handlers: RequestHandlers,
    metrics: Metrics,
    *,
    logger: PredictionLogger | None = None,
    traffic=None,
    shadows=None,
  ):
    """`traffic`: a traffic.TrafficPolicy (its current policy is read per request);
    `shadows`: a shadow.ShadowRunner for the mirrored copies."""
    self.handlers = handlers
    self.metrics = metrics
    self.logger = logger
    self.traffic = traffic
    self.shadows = shadows

  def serve(
    self,
    api: str,
    method: str,
    spec: ModelSpec,
    work: Callable[[RequestHandlers], Reply[R]],
    headers: Mapping[str, str] | None = None,
    deadline: float | None = None,
  ) -> Outcome[R]:
    """Runs `work(handlers)` for the request `method` of `api` ("grpc", "rest") on `spec`
    (decoding and encoding included, so a malformed request is counted too). `headers`: the
    request's gRPC metadata or HTTP headers (`get` by lower-case name); `deadline`: the
    client's, as a time.monotonic() instant (the router forwards it). Never raises."""
    start_us = time.time_ns() // 1000
    start = time.perf_counter()
    context = RequestContext(request_context.request_id(headers), headers or {})
    context.deadline = deadline
    # Drawn before the work, so that the work records arrays only for what will read them.
    log_config, mirror = self._draw_hooks(method, spec)
    context.wants_arrays = log_config is not None or mirror is not None
    if self.traffic is not None and method in ROUTED_METHODS:
      context.split = self.traffic.split_for(spec.name)
    value = served = None
    message = ""
    try:
      reply = work(self.handlers.with_context(context))
      code, value, served = grpc.StatusCode.OK, reply.value, reply.served
    except ServingError as e:
      code, message = e.code, e.message
    except Exception as e:
      logging.exception("%s %s failed", api, method)
      code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    version = served.version if served is not None else (context.version or spec.version)
    self.metrics.observe(api, method, spec.name, version, code.name, seconds)
    if context.wants_arrays:
      self._after_answer(log_config, mirror, method, spec, context, code, start_us, seconds)
    return Outcome(code, message, value, served, context.request_id, context.arm)

  def _draw_hooks(self, method: str, spec: ModelSpec):
    """(the model's logging config if this request is sampled for the log, the traffic
    policy's mirror if it is drawn for a copy), each None otherwise."""
    if method not in ROUTED_METHODS or (self.logger is None and self.shadows is None):
      return None, None
    config = self.handlers.models.configs.get(spec.name)
    logging_config = config.logging if config is not None else None
    logged = self.logger is not None and PredictionLogger.sampled(logging_config)
    mirror = None
    if self.shadows is not None and self.traffic is not None:
      mirror = self.traffic.mirror_for(spec.name)
      mirror = mirror if mirror is not None and mirror.sampled() else None
    return (logging_config if logged else None), mirror

  def _after_answer(
    self, logging_config, mirror, rpc: str, spec, context: RequestContext, code, start_us, seconds
  ):
    """Logs a sampled Predict, Classify or Regress and queues its drawn shadow copy; neither
    blocks. A request served by the mirror's own label gets no copy."""
    if logging_config is not None:
      meta = log_format.RecordMetadata(
        request_id=context.request_id,
        time_us=start_us,
        model_name=spec.name,
        version=context.version or 0,
        version_label=context.label,
        arm=context.arm,
        latency_us=int(seconds * 1e6),
        status_code=code.value[0],
        role="primary",
        rpc=rpc,
      )
      ok = code == grpc.StatusCode.OK
      self.logger.submit(
        LogEntry(
          logging_config,
          context.inputs or {},
          (context.outputs or {}) if ok else {},
          meta,
          context.signature_name or spec.signature_name or "serving_default",
          (spec.version, spec.label),
        )
      )
    if mirror is not None and context.inputs is not None and mirror.label != context.label:
      self.shadows.submit(spec, context, logging_config, mirror.label, rpc)
