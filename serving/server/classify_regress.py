"""TF Serving's Classify and Regress: tf.Examples in, ClassificationResult / RegressionResult out.

What `tensorflow_model_server` does (tensorflow_serving/servables/tensorflow/classifier.cc,
regressor.cc, util.cc; util/json_tensor.cc for REST), with the same status codes and messages:

- The signature is `model_spec.signature_name` (empty: `serving_default`). Its `method_name` must
  be `tensorflow/serving/classify` (or `.../regress`), as with TF Serving's
  `--enable_signature_method_name_check`: a Predict signature is never fed serialized Examples.
  It has exactly one input, `inputs`; a classify signature has one or two outputs among
  `classes` (DT_STRING [batch, k]) and `scores` (DT_FLOAT [batch, k]); a regress signature has
  one, `outputs` (DT_FLOAT [batch] or [batch, 1]).
- `input.example_list` is fed as a 1-D DT_STRING tensor of serialized Examples;
  `input.example_list_with_context` as the context's bytes followed by each example's, which
  protobuf parses as their merge (the example's features win over the context's).

Everything here is a pure conversion: serving/server/handlers.py runs the signature.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Mapping

import grpc
import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from serving import contract
from serving.server.errors import ServingError
from serving.server.example_features import HOW_TO_SEND, KIND_NAMES
from serving.server.loaded_version import SignatureInfo

INPUTS = contract.CLASSIFY_INPUTS
CLASSES = contract.CLASSIFY_OUTPUT_CLASSES
SCORES = contract.CLASSIFY_OUTPUT_SCORES
OUTPUTS = contract.REGRESS_OUTPUTS
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT64_MAX = 2**63 - 1


def _invalid(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# Request -> tensor.


def check_model_spec(request) -> None:
  """A Classify/Regress request without a model_spec is INVALID_ARGUMENT, as in TF Serving."""
  if not request.HasField("model_spec"):
    raise _invalid("Missing ModelSpec")


def serialized_examples(request_input: input_pb2.Input) -> np.ndarray:
  """The tensor TF Serving feeds for `request.input`: a 1-D object array of serialized Examples.
  Raises ServingError (INVALID_ARGUMENT "Input is empty.") when there are none."""
  kind = request_input.WhichOneof("kind")
  if kind == "example_list":
    serialized = [e.SerializeToString() for e in request_input.example_list.examples]
  elif kind == "example_list_with_context":
    with_context = request_input.example_list_with_context
    context = with_context.context.SerializeToString()
    serialized = [context + e.SerializeToString() for e in with_context.examples]
  else:
    serialized = []
  if not serialized:
    raise _invalid("Input is empty.")
  examples = np.empty(len(serialized), dtype=object)
  examples[:] = serialized
  return examples


def classification_signature(served, signature_name: str) -> SignatureInfo:
  """The classify signature `signature_name` of a loaded version (`.signatures`,
  `.signature_defs`). Raises ServingError (INVALID_ARGUMENT) as TF Serving's
  GetClassificationSignatureDef and PreProcessClassification."""
  signature, signature_def = _signature(
    served, signature_name, contract.CLASSIFY_METHOD_NAME, "classification"
  )
  if len(signature.outputs) not in (1, 2):
    raise _invalid(f"Expected one or two output Tensors, found {len(signature.outputs)}")
  if INPUTS not in signature.inputs:
    raise _invalid(f"No classification inputs found in SignatureDef: {signature_def}")
  if CLASSES not in signature.outputs and SCORES not in signature.outputs:
    raise _invalid(
      f'Expected classification signature outputs to contain at least one of "{CLASSES}" or '
      f'"{SCORES}". Signature was: {signature_def}'
    )
  return signature


def regression_signature(served, signature_name: str) -> SignatureInfo:
  """The regress signature `signature_name`; raises ServingError as TF Serving's
  GetRegressionSignatureDef and PreProcessRegression."""
  signature, signature_def = _signature(
    served, signature_name, contract.REGRESS_METHOD_NAME, "regression"
  )
  if len(signature.outputs) != 1:
    raise _invalid("Expected one output Tensor.")
  if INPUTS not in signature.inputs:
    raise _invalid(f"No regression inputs found in SignatureDef: {signature_def}")
  if OUTPUTS not in signature.outputs:
    raise _invalid(f"No regression outputs found in SignatureDef: {signature_def}")
  return signature


def _signature(served, name: str, method_name: str, kind: str):
  name = contract.resolve_signature_name(name)
  if name not in served.signatures:
    raise _invalid(f"No signature was found with the name: {name}")
  signature_def = served.signature_defs[name]
  if signature_def.method_name != method_name:
    raise _invalid(
      f"Expected {kind} signature method_name to be {method_name}. Was: {signature_def.method_name}"
    )
  signature = served.signatures[name]
  if len(signature.inputs) != 1:
    raise _invalid("Expected one input Tensor.")
  return signature, signature_def


# Tensors -> result.


def classification_result(
  outputs: dict[str, np.ndarray], num_examples: int
) -> classification_pb2.ClassificationResult:
  """`classes` and/or `scores` as TF Serving's PostProcessClassificationResult: example i, class j
  -> classifications[i].classes[j] (label, score). Raises ServingError (INVALID_ARGUMENT) for an
  output of the wrong rank, dtype or batch size."""
  classes, scores = outputs.get(CLASSES), outputs.get(SCORES)
  for name, value, dtype in ((CLASSES, classes, "DT_STRING"), (SCORES, scores, "DT_FLOAT")):
    if value is None:
      continue
    if value.ndim != 2:
      raise _invalid(
        f"Expected Tensor shape: [batch_size num_classes] but got {_shape_string(value)}"
      )
    if _dtype_name(value) != dtype:
      raise _invalid(f"Expected {name} Tensor of {dtype}. Got: {_dtype_name(value)}")
    if value.shape[0] != num_examples:
      raise _invalid(f"Expected {name} output batch size of {num_examples}. Got: {value.shape[0]}")
  if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
    raise _invalid(
      "Tensors class and score should match in dim_size(1). Got "
      f"{classes.shape[1]} vs. {scores.shape[1]}"
    )
  num_classes = (classes if classes is not None else scores).shape[1]
  labels = (
    [[""] * num_classes] * num_examples
    if classes is None
    else [[_label(v) for v in row] for row in classes]
  )
  scores = np.zeros((num_examples, num_classes), np.float32) if scores is None else scores
  result = classification_pb2.ClassificationResult()
  for i in range(num_examples):
    result.classifications.add().classes.extend(
      classification_pb2.Class(label=labels[i][j], score=scores[i, j]) for j in range(num_classes)
    )
  return result


def regression_result(
  outputs: dict[str, np.ndarray], num_examples: int
) -> regression_pb2.RegressionResult:
  """`outputs` [batch] or [batch, 1] as TF Serving's PostProcessRegressionResult. Raises
  ServingError (INVALID_ARGUMENT) for the wrong shape, batch size or dtype."""
  value = outputs[OUTPUTS]
  if not (value.ndim == 1 or (value.ndim == 2 and value.shape[1] == 1)):
    raise _invalid(
      "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
      f"{_shape_string(value)}"
    )
  if value.shape[0] != num_examples:
    raise _invalid(
      f"Input batch size did not match output batch size: {num_examples} vs. {value.shape[0]}"
    )
  if _dtype_name(value) != "DT_FLOAT":
    raise _invalid(f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_name(value)}")
  result = regression_pb2.RegressionResult()
  result.regressions.extend(regression_pb2.Regression(value=v) for v in value.reshape(-1))
  return result


def result_tensors(result) -> dict[str, np.ndarray]:
  """A ClassificationResult or RegressionResult as the signature outputs it came from (classes
  as bytes and scores [batch, num_classes], or outputs [batch]): what a router logs of a
  forwarded Classify or Regress, whose backend answered the result only."""
  if isinstance(result, regression_pb2.RegressionResult):
    return {OUTPUTS: np.array([r.value for r in result.regressions], np.float32)}
  rows = [list(c.classes) for c in result.classifications]
  classes = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
  classes[:] = [[c.label.encode() for c in row] for row in rows] if rows else classes
  scores = np.array([[c.score for c in row] for row in rows], np.float32).reshape(classes.shape)
  return {CLASSES: classes, SCORES: scores}


def _shape_string(value: np.ndarray) -> str:
  return "[" + ",".join(str(d) for d in value.shape) + "]"  # TensorShape::DebugString.


def _dtype_name(value: np.ndarray) -> str:
  import tensorflow as tf

  try:
    return types_pb2.DataType.Name(tf.as_dtype(value.dtype).as_datatype_enum)
  except TypeError:  # No TF dtype (e.g. numpy unicode).
    return str(value.dtype)


def _label(value) -> str:
  # Class.label is a proto `string`: Python protobuf needs UTF-8 where TF Serving copies bytes.
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# REST: POST /v1/models/NAME[/versions/N | /labels/L]:classify (or :regress), as TF Serving's
# json_tensor.cc: {"signature_name": s, "context": {feature: value}, "examples": [{...}, ...]}
# -> {"results": [[[label, score], ...], ...]} (classify) or {"results": [value, ...]} (regress).
# A value is a number, true/false, a string or {"b64": "..."}, or a list of one kind of these.
# TF Serving makes a number with a decimal point or exponent a float_list, others int64_list;
# here a feature the signature parses as float takes integers too (a float holds them), a list
# mixing integers and floats is a float_list, and any other mismatch is named before running.


@dataclasses.dataclass(frozen=True)
class JsonExamples:
  """A REST classify/regress body, checked for shape; `to_input` builds the Examples."""

  signature_name: str
  context: dict | None
  examples: list

  def to_input(self, features: Mapping[str, str] | None = None) -> input_pb2.Input:
    """The request's input.  `features`: {name: "float_list" | "int64_list" | "bytes_list"}
    the signature parses (empty: unknown). Raises ServingError (INVALID_ARGUMENT)."""
    features = features or {}
    request_input = input_pb2.Input()
    if self.context is not None:
      with_context = request_input.example_list_with_context
      _fill_example(self.context, with_context.context, features, "the context")
      target = with_context.examples
    else:
      target = request_input.example_list.examples
    for i, value in enumerate(self.examples):
      _fill_example(value, target.add(), features, f"example {i}")
    return request_input


def examples_from_json(body: bytes, verb: str = "classify") -> JsonExamples:
  """A REST body's signature name, context and examples. Raises ServingError
  (INVALID_ARGUMENT) as TF Serving's json_tensor.cc."""
  try:
    document = json.loads(body or b"null")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _invalid(f"JSON Parse error: {e}") from e
  if not isinstance(document, dict):
    raise _invalid(f"JSON Value: {_json_type(document)} is not a JSON object")
  signature_name = document.get("signature_name", "")
  if not isinstance(signature_name, str):
    raise _invalid("'signature_name' key must be a string value.")
  examples = document.get("examples")
  if examples is None:
    raise _invalid(f"When method is {verb}, key 'examples' is expected and was not found")
  if not isinstance(examples, list):
    raise _invalid("Expecting 'examples' value to be an list/array")
  if not examples:
    raise _invalid("'examples' value is an empty array")
  return JsonExamples(signature_name, document.get("context"), examples)


def request_from_json(body: bytes, request, features: Mapping[str, str] | None = None) -> None:
  """Fills a Classification/RegressionRequest's signature_name and input from a REST body.
  Raises ServingError (INVALID_ARGUMENT)."""
  parsed = examples_from_json(body)
  request.model_spec.signature_name = parsed.signature_name
  request.input.CopyFrom(parsed.to_input(features))


def _fill_example(value, example, features: Mapping[str, str], where: str) -> None:
  if not isinstance(value, dict):
    raise _invalid(f"Example must be JSON object but got JSON {_json_type(value)}")
  for name, content in value.items():
    elements = [_element(v, name) for v in (content if isinstance(content, list) else [content])]
    kind, values = _feature_values(name, elements, features.get(name), where)
    getattr(example.features.feature[name], kind).value.extend(values)


def _element(value, name: str) -> tuple[str, object]:
  """(kind, value) of one JSON element of feature `name`, as TF Serving reads it."""
  if isinstance(value, bool):
    return "int64_list", int(value)
  if isinstance(value, int):
    if value > _INT64_MAX:
      raise _invalid(f"Feature: {name} has uint64 element. Only int64 is supported.")
    return "int64_list", value
  if isinstance(value, float):
    if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
      raise _invalid(f"JSON value: {value} cannot be stored as float without loss of precision")
    return "float_list", value
  if isinstance(value, str):
    return "bytes_list", value.encode()
  if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
    try:
      return "bytes_list", base64.b64decode(value["b64"], validate=True)
    except ValueError as e:
      raise _invalid(f"Unable to base64 decode feature {name}: {e}") from e
  raise _invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")


def _feature_values(name: str, elements: list, expected: str | None, where: str):
  """The feature kind and values for `elements`: the signature's kind where it can hold them
  (integers into float), else ServingError naming the feature, both kinds and the fix."""
  given = {kind for kind, _ in elements}
  numbers = {"int64_list", "float_list"}
  if expected is None and given <= numbers:
    expected = "float_list" if "float_list" in given else "int64_list"
  elif expected is None and len(given) == 1:
    expected = next(iter(given))
  allowed = {"float_list": numbers}.get(expected, {expected})
  if not given <= allowed or expected is None:
    first = elements[0][0]
    wrong = next(v for k, v in elements if k not in allowed and (expected or k != first))
    wanted = (
      f"the signature parses it as {KIND_NAMES[expected]}; {HOW_TO_SEND[expected]}"
      if expected
      else "a feature holds one kind of value: send all numbers or all strings"
    )
    shown = json.dumps(wrong.decode("utf-8", "replace") if isinstance(wrong, bytes) else wrong)
    raise _invalid(
      f"feature '{name}' in {where}: got {_kinds(given)} (e.g. {shown:.40}) but {wanted}"
    )
  if expected == "float_list":
    return expected, [float(v) for _, v in elements]
  return expected, [v for _, v in elements]


def _kinds(kinds: set[str]) -> str:
  words = {"float_list": "floats", "int64_list": "integers", "bytes_list": "strings"}
  return " and ".join(words[k] for k in sorted(kinds))


def _json_type(value) -> str:
  for kind, name in ((type(None), "Null"), (bool, "Boolean"), (dict, "Object"), (list, "Array")):
    if isinstance(value, kind):
      return name
  return "String" if isinstance(value, str) else "Number"


def classification_json(result: classification_pb2.ClassificationResult) -> dict:
  return {
    "results": [
      [[c.label, c.score] for c in classifications.classes]
      for classifications in result.classifications
    ]
  }


def regression_json(result: regression_pb2.RegressionResult) -> dict:
  return {"results": [r.value for r in result.regressions]}
