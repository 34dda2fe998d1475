"""TF Serving's Classify and Regress: the exported digits classifier's `classify` signature and a
TF-built regression model, served by the model server in a subprocess, equal JAX (and TF); the
status codes and messages of TF Serving for bad requests; the conversions as unit tests."""

import dataclasses
import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from tensorflow_serving.apis import (  # noqa: E402
  classification_pb2,
  get_model_metadata_pb2,
  input_pb2,
  regression_pb2,
)

from serving.export import exporter as export  # noqa: E402
from serving.export import parity  # noqa: E402
from serving.server import classify_regress, model_manager  # noqa: E402
from serving.server.model_manager import ServingError, SignatureInfo, TensorSpec  # noqa: E402
from tests.helpers import model_server  # noqa: E402
from tests.helpers.configs import smoke_config  # noqa: E402
from tests.test_server import Server  # noqa: E402
from trainer import train  # noqa: E402

DT_FLOAT, DT_STRING = tf.float32.as_datatype_enum, tf.string.as_datatype_enum
LABELS = [str(c) for c in range(10)]


def _example(**features) -> tf.train.Example:
  """A tf.Example of float (float values), int64 (ints) or bytes (str/bytes) features."""
  example = tf.train.Example()
  for name, value in features.items():
    values = list(np.ravel(value)) if isinstance(value, list | np.ndarray) else [value]
    feature = example.features.feature[name]
    if isinstance(values[0], str | bytes):
      feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
    elif isinstance(values[0], int | np.integer):
      feature.int64_list.value.extend(int(v) for v in values)
    else:
      feature.float_list.value.extend(float(v) for v in values)
  return example


def _request(kind, examples=(), context=None, **spec):
  request = (
    classification_pb2.ClassificationRequest()
    if kind == "classify"
    else regression_pb2.RegressionRequest()
  )
  request.model_spec.name = spec.pop("name", "digits")
  if "version" in spec:
    request.model_spec.version.value = spec.pop("version")
  request.model_spec.signature_name = spec.pop("signature_name", "")
  assert not spec, spec
  if context is not None:
    request.input.example_list_with_context.context.CopyFrom(context)
    request.input.example_list_with_context.examples.extend(examples)
  else:
    request.input.example_list.examples.extend(examples)
  return request


# A TF-built model with Regress signatures: `outputs` = scale * x + bias, x and bias float
# features (bias defaults to 0).


class _Regressor(tf.Module):
  def _parse(self, inputs):
    features = {
      "x": tf.io.FixedLenFeature([], tf.float32),
      "bias": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    }
    return tf.io.parse_example(inputs, features)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def regress(self, inputs):
    parsed = self._parse(inputs)
    return {"outputs": 2.0 * parsed["x"] + parsed["bias"]}  # (batch,)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def regress_column(self, inputs):
    parsed = self._parse(inputs)
    return {"outputs": (3.0 * parsed["x"] + parsed["bias"])[:, None]}  # (batch, 1)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def one_output_for_all(self, inputs):
    return {"outputs": tf.reduce_sum(self._parse(inputs)["x"], keepdims=True)}  # (1,)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def predict(self, inputs):
    return {"outputs": self._parse(inputs)["x"]}


def _save_regressor(path: str) -> None:
  module = _Regressor()
  signatures = {
    "serving_default": module.regress_column,
    "regress": module.regress,
    "one_output_for_all": module.one_output_for_all,
    "predict": module.predict,
  }
  tf.saved_model.save(module, path, signatures=signatures)
  export.set_method_names(
    path,
    {name: classify_regress.REGRESS_METHOD_NAME for name in signatures if name != "predict"},
  )


# Fixtures: one smoke-trained digits export and the regressor, served by one server.


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits")
  train.train_and_evaluate(smoke_config({}), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def models(digits_run, tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  result = export.export(digits_run, str(root / "digits"))
  assert "classify/scores" in result.parity
  _save_regressor(str(root / "regressor" / "1"))
  return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
  (models / "models.config").write_text(
    f"""model_config_list {{
      config {{ name: "digits" base_path: "{models / "digits"}" model_platform: "tensorflow" }}
      config {{ name: "regressor" base_path: "{models / "regressor"}" }}
    }}"""
  )
  with Server(
    str(models / "digits"),
    str(tmp_path_factory.mktemp("logs") / "server.log"),
    models_args=[f"--model_config_file={models / 'models.config'}"],
  ) as server:
    yield server


@pytest.fixture(scope="module")
def pixels():
  return model_server.digits_pixels()


@pytest.fixture(scope="module")
def probabilities(digits_run, pixels):
  return model_server.jax_digits_outputs(digits_run, pixels)["probabilities"]


def _labels_and_scores(result: classification_pb2.ClassificationResult):
  labels = [[c.label for c in e.classes] for e in result.classifications]
  return labels, np.array([[c.score for c in e.classes] for e in result.classifications])


def _code_and_message(call, request) -> tuple[str, str]:
  with pytest.raises(grpc.RpcError) as error:
    call(request, timeout=30)
  return error.value.code().name, error.value.details()


# Over gRPC.


def test_classify_digits_matches_jax(server, pixels, probabilities):
  examples = [_example(inputs=row) for row in pixels]
  response = server.predict_stub.Classify(
    _request("classify", examples, signature_name="classify"), timeout=30
  )
  assert response.model_spec.name == "digits"
  assert response.model_spec.version.value == 1
  assert response.model_spec.signature_name == "classify"
  labels, scores = _labels_and_scores(response.result)
  assert labels == [LABELS] * len(pixels)  # Every class, in index order.
  np.testing.assert_allclose(scores, probabilities, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(scores.argmax(-1), probabilities.argmax(-1))


def test_classify_with_context_merges_it_into_every_example(server, pixels, probabilities):
  """TF Serving feeds context bytes + example bytes: the context's features reach examples that
  lack them, and an example's own feature wins."""
  request = _request(
    "classify",
    [tf.train.Example(), _example(inputs=pixels[1])],
    context=_example(inputs=pixels[0]),
    signature_name="classify",
    version=1,
  )
  _, scores = _labels_and_scores(server.predict_stub.Classify(request, timeout=30).result)
  np.testing.assert_allclose(scores, probabilities[:2], rtol=1e-5, atol=1e-7)


def test_digits_metadata_lists_the_classify_method(server):
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
  request.model_spec.name = "digits"
  response = server.predict_stub.GetModelMetadata(request, timeout=30)
  signature_defs = get_model_metadata_pb2.SignatureDefMap()
  response.metadata["signature_def"].Unpack(signature_defs)
  classify = signature_defs.signature_def["classify"]
  assert classify.method_name == "tensorflow/serving/classify"
  assert classify.inputs["inputs"].dtype == DT_STRING
  assert [d.size for d in classify.outputs["scores"].tensor_shape.dim] == [-1, 10]
  assert classify.outputs["classes"].dtype == DT_STRING
  assert signature_defs.signature_def["serving_default"].method_name == (
    "tensorflow/serving/predict"
  )


ROW = np.ones(64, np.float32)
BAD_CLASSIFY = [
  (
    "predict signature (the default)",
    lambda: _request("classify", [_example(inputs=ROW)]),
    "INVALID_ARGUMENT",
    "Expected classification signature method_name to be tensorflow/serving/classify. "
    "Was: tensorflow/serving/predict",
  ),
  (
    "unknown signature",
    lambda: _request("classify", [_example(inputs=ROW)], signature_name="nope"),
    "INVALID_ARGUMENT",
    "No signature was found with the name: nope",
  ),
  (
    "no examples",
    lambda: _request("classify", signature_name="classify"),
    "INVALID_ARGUMENT",
    "Input is empty.",
  ),
  (
    "context without examples",
    lambda: _request("classify", context=_example(inputs=ROW), signature_name="classify"),
    "INVALID_ARGUMENT",
    "Input is empty.",
  ),
  (
    "no model_spec",
    lambda: classification_pb2.ClassificationRequest(),
    "INVALID_ARGUMENT",
    "Missing ModelSpec",
  ),
  (
    "unknown model",
    lambda: _request("classify", [_example(inputs=ROW)], name="nope"),
    "NOT_FOUND",
    "nope",
  ),
  (
    "missing feature",
    lambda: _request("classify", [_example(pixels=ROW)], signature_name="classify"),
    "INVALID_ARGUMENT",
    "inputs",
  ),
  (
    "short feature",
    lambda: _request("classify", [_example(inputs=ROW[:63])], signature_name="classify"),
    "INVALID_ARGUMENT",
    "64",
  ),
  (
    "regress signature",
    lambda: _request("classify", [_example(x=1.0)], name="regressor", signature_name="regress"),
    "INVALID_ARGUMENT",
    "Was: tensorflow/serving/regress",
  ),
]


@pytest.mark.parametrize(
  "make_request, code, message", [b[1:] for b in BAD_CLASSIFY], ids=[b[0] for b in BAD_CLASSIFY]
)
def test_bad_classify_gets_tf_serving_status(server, make_request, code, message):
  got_code, got_message = _code_and_message(server.predict_stub.Classify, make_request())
  assert got_code == code, got_message
  assert message in got_message


def test_regress_tf_model(server):
  examples = [_example(x=1.0), _example(x=-2.5, bias=0.5), _example(x=4.0)]
  response = server.predict_stub.Regress(
    _request("regress", examples, name="regressor", signature_name="regress"), timeout=30
  )
  assert response.model_spec.name == "regressor"
  assert response.model_spec.signature_name == "regress"
  assert [r.value for r in response.result.regressions] == [2.0, -4.5, 8.0]

  # serving_default: [batch, 1] outputs; a context shared by examples (theirs win).
  default = server.predict_stub.Regress(
    _request(
      "regress",
      [_example(x=1.0), _example(x=1.0, bias=-1.0)],
      context=_example(bias=10.0),
      name="regressor",
    ),
    timeout=30,
  )
  assert default.model_spec.signature_name == "serving_default"
  assert [r.value for r in default.result.regressions] == [13.0, 2.0]


BAD_REGRESS = [
  (
    "predict signature",
    dict(name="regressor", signature_name="predict"),
    "Expected regression signature method_name to be tensorflow/serving/regress. "
    "Was: tensorflow/serving/predict",
  ),
  (
    "output batch size",
    dict(name="regressor", signature_name="one_output_for_all"),
    "Input batch size did not match output batch size: 2 vs. 1",
  ),
  (
    "classify signature",
    dict(name="digits", signature_name="classify"),
    "Was: tensorflow/serving/classify",
  ),
  ("unknown signature", dict(name="regressor", signature_name="nope"), "No signature was found"),
]


@pytest.mark.parametrize(
  "spec, message", [b[1:] for b in BAD_REGRESS], ids=[b[0] for b in BAD_REGRESS]
)
def test_bad_regress_gets_tf_serving_status(server, spec, message):
  request = _request("regress", [_example(x=1.0), _example(x=2.0)], **spec)
  code, got_message = _code_and_message(server.predict_stub.Regress, request)
  assert code == "INVALID_ARGUMENT", got_message
  assert message in got_message
  empty = _request("regress", name="regressor", signature_name="regress")
  assert _code_and_message(server.predict_stub.Regress, empty) == (
    "INVALID_ARGUMENT",
    "Input is empty.",
  )


# Export: the parity gate covers the classify signature; method names are rewritten.


def test_parity_gate_checks_the_classify_signature(digits_run, tmp_path, monkeypatch):
  """A classify signature that parses the examples wrong fails the export, which leaves
  nothing behind, while serving_default is still right."""
  original = export.build_signatures

  def misparsing_classify(model, max_new_tokens):
    signature_list = original(model, max_new_tokens)
    classify = next(s for s in signature_list if s.name == "classify")

    def scaled(inputs):
      return {"inputs": classify.tf_preprocessor(inputs)["inputs"] * 1.5}

    return [
      dataclasses.replace(s, tf_preprocessor=scaled) if s is classify else s for s in signature_list
    ]

  monkeypatch.setattr(export, "build_signatures", misparsing_classify)
  with pytest.raises(parity.ParityError, match=r"^classify/scores: relative error"):
    export.export(digits_run, str(tmp_path / "models"))
  assert os.listdir(tmp_path / "models") == []


def test_set_method_names_rewrites_signatures_and_fingerprint(tmp_path):
  from tensorflow.core.protobuf import fingerprint_pb2
  from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

  path = str(tmp_path / "regressor")
  _save_regressor(path)
  loaded = model_manager.LoadedVersion("regressor", 1, path)
  methods = {name: d.method_name for name, d in loaded.signature_defs.items()}
  assert methods["regress"] == methods["serving_default"] == "tensorflow/serving/regress"
  assert methods["predict"] == "tensorflow/serving/predict"
  with open(os.path.join(path, "fingerprint.pb"), "rb") as f:
    written = fingerprint_pb2.FingerprintDef.FromString(f.read())
  recomputed = fingerprint_pb2.FingerprintDef.FromString(fingerprinting.CreateFingerprintDef(path))
  written.ClearField("uuid")  # Random per write.
  recomputed.ClearField("uuid")
  assert written == recomputed  # Not stale: the checksum and signature hash are the new ones.
  with pytest.raises(KeyError, match="has no signature 'nope'"):
    export.set_method_names(path, {"nope": classify_regress.REGRESS_METHOD_NAME})


# REST.


def test_rest_classify_and_regress(server, pixels, probabilities):
  body = {"signature_name": "classify", "examples": [{"inputs": r} for r in pixels[:3].tolist()]}
  status, result = server.request("POST", "/v1/models/digits:classify", json.dumps(body).encode())
  assert status == 200, result
  assert [[label for label, _ in row] for row in result["results"]] == [LABELS] * 3
  scores = [[score for _, score in row] for row in result["results"]]
  np.testing.assert_allclose(scores, probabilities[:3], rtol=1e-5, atol=1e-7)

  body = {"signature_name": "regress", "context": {"bias": 1.5}, "examples": [{"x": 2.0}]}
  status, result = server.request(
    "POST", "/v1/models/regressor/versions/1:regress", json.dumps(body).encode()
  )
  assert (status, result) == (200, {"results": [5.5]})

  body = {"signature_name": "classify", "examples": [{"inputs": ROW.tolist()}]}
  status, result = server.request("POST", "/v1/models/digits:regress", json.dumps(body).encode())
  assert status == 400 and "Expected regression signature method_name" in result["error"]
  assert server.get("/v1/models/digits:classify")[0] == 400  # POST only.


# Unit tests of the conversions.


def test_serialized_examples_with_and_without_context():
  examples = [_example(x=1.0), _example(x=2.0, y="b")]
  plain = input_pb2.Input()
  plain.example_list.examples.extend(examples)
  tensor = classify_regress.serialized_examples(plain)
  assert tensor.shape == (2,) and tensor.dtype == object
  assert [tf.train.Example.FromString(t) for t in tensor] == examples

  with_context = input_pb2.Input()
  with_context.example_list_with_context.context.CopyFrom(_example(y="context", z=7))
  with_context.example_list_with_context.examples.extend(examples)
  merged = [
    tf.train.Example.FromString(t) for t in classify_regress.serialized_examples(with_context)
  ]
  assert merged == [_example(x=1.0, y="context", z=7), _example(x=2.0, y="b", z=7)]

  for empty in (input_pb2.Input(), with_context):
    empty.example_list_with_context.ClearField("examples")
    with pytest.raises(ServingError, match=r"^Input is empty\.$") as error:
      classify_regress.serialized_examples(empty)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_classification_result_from_classes_and_or_scores():
  classes = np.array([[b"cat", b"dog"], [b"dog", b"cat"]], dtype=object)
  scores = np.array([[0.75, 0.25], [0.5, 0.5]], np.float32)
  both = classify_regress.classification_result({"classes": classes, "scores": scores}, 2)
  assert _labels_and_scores(both)[0] == [["cat", "dog"], ["dog", "cat"]]
  np.testing.assert_array_equal(_labels_and_scores(both)[1], scores)
  only_scores = classify_regress.classification_result({"scores": scores}, 2)
  assert _labels_and_scores(only_scores)[0] == [["", ""], ["", ""]]
  only_classes = classify_regress.classification_result({"classes": classes}, 2)
  assert _labels_and_scores(only_classes)[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]


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


CLASSIFY = classify_regress.CLASSIFY_METHOD_NAME
REGRESS = classify_regress.REGRESS_METHOD_NAME


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
  assert with_context.context == _example(country="fr", ids=[1, 2], flag=1)
  assert list(with_context.examples) == [
    _example(x=1.5, image=b"hi", xs=[0.5, 2.0]),
    _example(x=2000.0),
  ]
  plain = classification_pb2.ClassificationRequest()
  classify_regress.request_from_json(b'{"examples": [{"x": 1}]}', plain)
  assert list(plain.input.example_list.examples) == [_example(x=1)]


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
      b'{"examples": [{"x": [1.0, 2]}]}',
      "Unexpected element type in feature: x expecting type: float",
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
