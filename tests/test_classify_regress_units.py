"""Classify/Regress conversions as unit tests (no server process): tf.Examples in, results out,
REST JSON to Examples (integers into float features, clear mismatches), TF's parse errors
explained, signature resolution."""

import json

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")

from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2  # noqa: E402

from serving import contract  # noqa: E402
from serving.server import classify_regress, example_features  # noqa: E402
from serving.server.errors import ServingError  # noqa: E402
from serving.server.loaded_version import SignatureInfo, TensorSpec  # noqa: E402
from tests.helpers.tf_examples import example, labels_and_scores  # noqa: E402

DT_FLOAT, DT_STRING = tf.float32.as_datatype_enum, tf.string.as_datatype_enum


def test_serialized_examples_with_and_without_context():
  examples = [example(x=1.0), example(x=2.0, y="b")]
  plain = input_pb2.Input()
  plain.example_list.examples.extend(examples)
  tensor = classify_regress.serialized_examples(plain)
  assert tensor.shape == (2,) and tensor.dtype == object
  assert [tf.train.Example.FromString(t) for t in tensor] == examples

  with_context = input_pb2.Input()
  with_context.example_list_with_context.context.CopyFrom(example(y="context", z=7))
  with_context.example_list_with_context.examples.extend(examples)
  merged = [
    tf.train.Example.FromString(t) for t in classify_regress.serialized_examples(with_context)
  ]
  assert merged == [example(x=1.0, y="context", z=7), example(x=2.0, y="b", z=7)]

  for empty in (input_pb2.Input(), with_context):
    empty.example_list_with_context.ClearField("examples")
    with pytest.raises(ServingError, match=r"^Input is empty\.$") as error:
      classify_regress.serialized_examples(empty)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_classification_result_from_classes_and_or_scores():
  classes = np.array([[b"cat", b"dog"], [b"dog", b"cat"]], dtype=object)
  scores = np.array([[0.75, 0.25], [0.5, 0.5]], np.float32)
  both = classify_regress.classification_result({"classes": classes, "scores": scores}, 2)
  assert labels_and_scores(both)[0] == [["cat", "dog"], ["dog", "cat"]]
  np.testing.assert_array_equal(labels_and_scores(both)[1], scores)
  only_scores = classify_regress.classification_result({"scores": scores}, 2)
  assert labels_and_scores(only_scores)[0] == [["", ""], ["", ""]]
  only_classes = classify_regress.classification_result({"classes": classes}, 2)
  assert labels_and_scores(only_classes)[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize(
  "outputs, message",
  [
    ({"scores": np.zeros(2, np.float32)}, r"Expected Tensor shape: \[batch_size num_classes\]"),
    ({"scores": np.zeros((2, 3))}, "Expected scores Tensor of DT_FLOAT. Got: DT_DOUBLE"),
    (
      {"classes": np.zeros((2, 3), np.int32)},
      "Expected classes Tensor of DT_STRING. Got: DT_INT32",
    ),
    ({"scores": np.zeros((1, 3), np.float32)}, "Expected scores output batch size of 2. Got: 1"),
    (
      {"classes": np.full((2, 2), b"a", object), "scores": np.zeros((2, 3), np.float32)},
      "Tensors class and score should match in dim_size(1). Got 2 vs. 3",
    ),
  ],
)
def test_classification_result_rejects_bad_outputs(outputs, message):
  with pytest.raises(ServingError) as error:
    classify_regress.classification_result(outputs, 2)
  assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert message.replace("\\", "") in error.value.message


def test_regression_result():
  for outputs in (np.array([1.5, -2.0], np.float32), np.array([[1.5], [-2.0]], np.float32)):
    result = classify_regress.regression_result({"outputs": outputs}, 2)
    assert [r.value for r in result.regressions] == [1.5, -2.0]
  for outputs, message in (
    (np.zeros((2, 2), np.float32), "[batch_size] or [batch_size, 1] but got [2,2]"),
    (np.zeros(3, np.float32), "Input batch size did not match output batch size: 2 vs. 3"),
    (np.zeros(2, np.int64), "Expected output Tensor of DT_FLOAT.  Got: DT_INT64"),
  ):
    with pytest.raises(ServingError) as error:
      classify_regress.regression_result({"outputs": outputs}, 2)
    assert message in error.value.message


class _Served:
  """The parts of a LoadedVersion that signature resolution reads."""

  def __init__(self, method_name, inputs, outputs):
    from tensorflow.core.protobuf import meta_graph_pb2

    signature_def = meta_graph_pb2.SignatureDef(method_name=method_name)
    for name in inputs:
      signature_def.inputs[name].dtype = DT_STRING
    for name in outputs:
      signature_def.outputs[name].dtype = DT_FLOAT
    spec = TensorSpec(DT_FLOAT, (-1,))
    self.signature_defs = {"serving_default": signature_def}
    self.signatures = {
      "serving_default": SignatureInfo(
        "serving_default", dict.fromkeys(inputs, spec), dict.fromkeys(outputs, spec)
      )
    }


CLASSIFY = contract.CLASSIFY_METHOD_NAME
REGRESS = contract.REGRESS_METHOD_NAME


@pytest.mark.parametrize(
  "resolve, served, message",
  [
    ("classification", _Served(CLASSIFY, ["inputs"], ["scores"]), None),
    ("classification", _Served(CLASSIFY, ["inputs"], ["classes", "other"]), None),
    ("classification", _Served(CLASSIFY, ["inputs", "x"], ["scores"]), "Expected one input"),
    ("classification", _Served(CLASSIFY, ["x"], ["scores"]), "No classification inputs found"),
    ("classification", _Served(CLASSIFY, ["inputs"], []), "one or two output Tensors, found 0"),
    ("classification", _Served(CLASSIFY, ["inputs"], ["a", "b"]), 'least one of "classes" or'),
    ("regression", _Served(REGRESS, ["inputs"], ["outputs"]), None),
    ("regression", _Served(REGRESS, ["inputs"], ["outputs", "x"]), "Expected one output Tensor."),
    ("regression", _Served(REGRESS, ["inputs"], ["x"]), "No regression outputs found"),
    ("regression", _Served(CLASSIFY, ["inputs"], ["outputs"]), "Was: tensorflow/serving/classify"),
  ],
)
def test_signature_resolution(resolve, served, message):
  find = getattr(classify_regress, f"{resolve}_signature")
  if message is None:
    assert find(served, "").name == "serving_default"
    return
  with pytest.raises(ServingError) as error:
    find(served, "serving_default")
  assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert message in error.value.message


def test_request_from_json_builds_examples_as_tf_serving():
  request = regression_pb2.RegressionRequest()
  body = {
    "signature_name": "regress",
    "context": {"country": "fr", "ids": [1, 2], "flag": True},
    "examples": [{"x": 1.5, "image": {"b64": "aGk="}, "xs": [0.5, 2.0]}, {"x": 2e3}],
  }
  classify_regress.request_from_json(json.dumps(body).encode(), request)
  assert request.model_spec.signature_name == "regress"
  with_context = request.input.example_list_with_context
  assert with_context.context == example(country="fr", ids=[1, 2], flag=1)
  assert list(with_context.examples) == [
    example(x=1.5, image=b"hi", xs=[0.5, 2.0]),
    example(x=2000.0),
  ]
  plain = classification_pb2.ClassificationRequest()
  classify_regress.request_from_json(b'{"examples": [{"x": 1}]}', plain)
  assert list(plain.input.example_list.examples) == [example(x=1)]


@pytest.mark.parametrize(
  "body, message",
  [
    (b"{not json", "JSON Parse error"),
    (b"[]", "is not a JSON object"),
    (b'{"examples": []}', "'examples' value is an empty array"),
    (b'{"instances": [1]}', "key 'examples' is expected and was not found"),
    (b'{"examples": {"x": 1}}', "to be an list/array"),
    (b'{"examples": [[1.0]]}', "Example must be JSON object but got JSON Array"),
    (
      b'{"examples": [{"x": [1.0, "a"]}]}',
      "feature 'x' in example 0: got strings and floats (e.g. \"a\") but a feature holds one kind "
      "of value: send all numbers or all strings",
    ),
    (b'{"examples": [{"x": null}]}', "Feature: x has element with unexpected JSON type: Null"),
    (b'{"examples": [{"x": [[1.0]]}]}', "unexpected JSON type: Array"),
    (b'{"examples": [{"x": 1e300}]}', "loss of precision"),
    (b'{"examples": [{"x": 18446744073709551615}]}', "Only int64 is supported"),
    (b'{"examples": [{"x": {"b64": "!!"}}]}', "base64"),
    (b'{"signature_name": 3, "examples": [{"x": 1}]}', "'signature_name' key must be a string"),
  ],
)
def test_request_from_json_rejects_what_tf_serving_rejects(body, message):
  with pytest.raises(ServingError) as error:
    classify_regress.request_from_json(body, classification_pb2.ClassificationRequest())
  assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert message in error.value.message


def test_results_as_json():
  result = classification_pb2.ClassificationResult()
  result.classifications.add().classes.add(label="car", score=0.25)
  assert classify_regress.classification_json(result) == {"results": [[["car", 0.25]]]}
  regressions = regression_pb2.RegressionResult()
  regressions.regressions.add(value=0.5)
  assert classify_regress.regression_json(regressions) == {"results": [0.5]}


def test_json_integers_fill_a_float_feature_and_mismatches_name_the_fix():
  parsed = classify_regress.examples_from_json(
    b'{"context": {"bias": 1}, "examples": [{"x": [1, 2.5], "n": 3, "s": "a"}]}'
  )
  features = {"x": "float_list", "bias": "float_list", "n": "int64_list", "s": "bytes_list"}
  request_input = parsed.to_input(features)
  with_context = request_input.example_list_with_context
  assert with_context.context == example(bias=1.0)
  assert list(with_context.examples) == [example(x=[1.0, 2.5], n=3, s="a")]
  assert with_context.examples[0].features.feature["x"].WhichOneof("kind") == "float_list"
  # Unknown to the signature: TF Serving's kinds, but a list mixing ints and floats is float.
  assert parsed.to_input({}).example_list_with_context.context == example(bias=1)
  for body, message in (
    (
      b'{"examples": [{"n": 2.5}]}',
      "feature 'n' in example 0: got floats (e.g. 2.5) but the "
      "signature parses it as int64; send integers without a decimal point",
    ),
    (b'{"examples": [{"s": 1}]}', "got integers (e.g. 1) but the signature parses it as bytes"),
    (b'{"context": {"x": "a"}, "examples": [{}]}', "feature 'x' in the context: got strings"),
  ):
    with pytest.raises(ServingError) as error:
      classify_regress.examples_from_json(body).to_input(features)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.message


def test_the_features_a_signature_parses_are_read_from_its_graph():
  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def parse(serialized):
    spec = {
      "pixels": tf.io.FixedLenFeature([4], tf.float32),
      "id": tf.io.FixedLenFeature([], tf.int64),
      "tags": tf.io.VarLenFeature(tf.string),
    }
    return tf.io.parse_example(serialized, spec)

  graph = parse.get_concrete_function().graph
  assert example_features.parsed_features(graph) == {
    "pixels": "float_list",
    "id": "int64_list",
    "tags": "bytes_list",
  }


def test_tensorflow_parse_errors_are_explained():
  graph_error = "Graph execution error:\n\nDetected at node ParseExample/ParseExampleV2\n"
  mismatch = graph_error + (
    "Name: <unknown>, Key: inputs, Index: 0.  Data types don't match. Data type: int64 but "
    "expected type: float\n\t [[{{node ParseExample/ParseExampleV2}}]]"
  )
  assert example_features.explain_parse_error(mismatch) == (
    "feature 'inputs' of example 0 holds int64 values but the signature parses it as float; "
    "send numbers (JSON 0.5 or 3; gRPC: float_list)"
  )
  missing = graph_error + (
    "Name: <unknown>, Feature: inputs (data type: float) is required but could not be found."
  )
  assert example_features.explain_parse_error(missing) == (
    "feature 'inputs' (float) is required but an example lacks it; give it in every example "
    "(or in the context)"
  )
  assert example_features.explain_parse_error("Matrix size-incompatible") is None
