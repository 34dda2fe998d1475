"""TF Serving's MultiInference: several Classify and Regress signatures of one model version, on
the same tf.Examples, in one request.

As `tensorflow_model_server` (tensorflow_serving/servables/tensorflow/multi_inference.cc and
multi_inference_helper.cc), with its status codes and messages:

- The version is the one the first task's model_spec asks for (a version, a label or the latest);
  every task must name the same model. The other tasks' versions and labels are not read.
- Each task names a signature (empty: `serving_default`) at most once, with `method_name`
  `tensorflow/serving/classify` or `.../regress` (any other is UNIMPLEMENTED); the signature is
  checked as Classify's and Regress's own. Every task is checked before any runs.
- Result i answers task i: its model and signature, the version that ran.

TF Serving fetches every signature's outputs in one Session::Run. Here each signature runs on its
own, on Examples serialized once, so a request of two tasks costs two model calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import grpc
import numpy as np
from tensorflow_serving.apis import inference_pb2, input_pb2

from serving import contract
from serving.server import classify_regress
from serving.server.errors import ServingError
from serving.server.loaded_version import LoadedVersion

# method_name -> (the signature check, the result builder, the InferenceResult field).
_METHODS = {
  contract.CLASSIFY_METHOD_NAME: (
    classify_regress.classification_signature,
    classify_regress.classification_result,
    "classification_result",
  ),
  contract.REGRESS_METHOD_NAME: (
    classify_regress.regression_signature,
    classify_regress.regression_result,
    "regression_result",
  ),
}


@dataclasses.dataclass(frozen=True)
class Task:
  signature_name: str  # Resolved: never empty.
  method_name: str


def _invalid(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def tasks_of(request: inference_pb2.MultiInferenceRequest) -> list[Task]:
  """The request's tasks, checked without a model: ServingError INVALID_ARGUMENT for no task, an
  empty or differing model name or a signature named twice; UNIMPLEMENTED for a method other
  than classify or regress."""
  if not request.tasks:
    raise _invalid("MultiInferenceRequest has no tasks; add one per Classify or Regress signature")
  model_name = request.tasks[0].model_spec.name
  tasks, seen = [], set()
  for task in request.tasks:
    if not task.model_spec.name:
      raise _invalid("Found ModelSpec with an empty model name.")
    if task.model_spec.name != model_name:
      raise _invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
    name = contract.resolve_signature_name(task.model_spec.signature_name)
    if name in seen:
      raise _invalid(f"Duplicate evaluation of signature: {name}")
    seen.add(name)
    if task.method_name not in _METHODS:
      raise ServingError(
        grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {task.method_name}"
      )
    tasks.append(Task(name, task.method_name))
  return tasks


def infer(
  served: LoadedVersion,
  tasks: list[Task],
  request_input: input_pb2.Input,
  run: Callable[[str, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
) -> inference_pb2.MultiInferenceResponse:
  """Every task's signature of `served` on `request_input`'s Examples, through `run(signature
  name, inputs) -> outputs`. Raises ServingError as Classify and Regress do."""
  signatures = []
  for task in tasks:  # All checked before the first runs.
    if task.signature_name not in served.signatures:
      raise _invalid(f"Requested signature not found in model graph: {task.signature_name}")
    signatures.append(_METHODS[task.method_name][0](served, task.signature_name))
  examples = classify_regress.serialized_examples(request_input)
  response = inference_pb2.MultiInferenceResponse()
  for task, signature in zip(tasks, signatures, strict=True):
    _, result_of, field = _METHODS[task.method_name]
    outputs = run(signature.name, {classify_regress.INPUTS: examples})
    result = response.results.add()
    getattr(result, field).CopyFrom(result_of(outputs, len(examples)))
    result.model_spec.name = served.model_name
    result.model_spec.version.value = served.version
    result.model_spec.signature_name = signature.name
  return response
