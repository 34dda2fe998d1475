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
  regression_pb2,
)

from serving import contract  # noqa: E402
from serving.export import exporter as export  # noqa: E402
from serving.export import parity  # noqa: E402
from serving.server import loaded_version  # noqa: E402
from tests.helpers import model_server  # noqa: E402
from tests.helpers.tf_examples import example, labels_and_scores  # noqa: E402
from tests.helpers.tf_regressor import save_regressor  # noqa: E402

DT_FLOAT, DT_STRING = tf.float32.as_datatype_enum, tf.string.as_datatype_enum
LABELS = [str(c) for c in range(10)]


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


# Fixtures: one smoke-trained digits export and the regressor, served by one server.


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  return model_server.digits_export(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  version = model_server.digits_export(tmp_path_factory)[1]
  with open(contract.export_manifest_path(version)) as f:
    assert "classify/scores" in json.load(f)["parity_max_relative_error"]
  model_server.copy_version(version, str(root / "digits"))
  save_regressor(str(root / "regressor" / "1"))
  return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
  (models / "models.config").write_text(
    f"""model_config_list {{
      config {{ name: "digits" base_path: "{models / "digits"}" model_platform: "tensorflow" }}
      config {{ name: "regressor" base_path: "{models / "regressor"}" }}
    }}"""
  )
  args = [*model_server.QUICK_ARGS, f"--model_config_file={models / 'models.config'}"]
  with model_server.Server(args, str(tmp_path_factory.mktemp("logs") / "server.log")) as server:
    yield server


@pytest.fixture(scope="module")
def pixels():
  return model_server.digits_pixels()


@pytest.fixture(scope="module")
def probabilities(digits_run, pixels):
  return model_server.jax_digits_outputs(digits_run, pixels)["probabilities"]


def _code_and_message(call, request) -> tuple[str, str]:
  with pytest.raises(grpc.RpcError) as error:
    call(request, timeout=30)
  return error.value.code().name, error.value.details()


# Over gRPC.


def test_classify_digits_matches_jax(server, pixels, probabilities):
  examples = [example(inputs=row) for row in pixels]
  response = server.predict_stub.Classify(
    _request("classify", examples, signature_name="classify"), timeout=30
  )
  assert response.model_spec.name == "digits"
  assert response.model_spec.version.value == 1
  assert response.model_spec.signature_name == "classify"
  labels, scores = labels_and_scores(response.result)
  assert labels == [LABELS] * len(pixels)  # Every class, in index order.
  np.testing.assert_allclose(scores, probabilities, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(scores.argmax(-1), probabilities.argmax(-1))


def test_classify_with_context_merges_it_into_every_example(server, pixels, probabilities):
  """TF Serving feeds context bytes + example bytes: the context's features reach examples that
  lack them, and an example's own feature wins."""
  request = _request(
    "classify",
    [tf.train.Example(), example(inputs=pixels[1])],
    context=example(inputs=pixels[0]),
    signature_name="classify",
    version=1,
  )
  _, scores = labels_and_scores(server.predict_stub.Classify(request, timeout=30).result)
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
    lambda: _request("classify", [example(inputs=ROW)]),
    "INVALID_ARGUMENT",
    "Expected classification signature method_name to be tensorflow/serving/classify. "
    "Was: tensorflow/serving/predict",
  ),
  (
    "unknown signature",
    lambda: _request("classify", [example(inputs=ROW)], signature_name="nope"),
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
    lambda: _request("classify", context=example(inputs=ROW), signature_name="classify"),
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
    lambda: _request("classify", [example(inputs=ROW)], name="nope"),
    "NOT_FOUND",
    "Servable not found for request: 'nope'",
  ),
  (
    "missing feature",
    lambda: _request("classify", [example(pixels=ROW)], signature_name="classify"),
    "INVALID_ARGUMENT",
    "feature 'inputs' (float) is required but an example lacks it",
  ),
  (
    "short feature",
    lambda: _request("classify", [example(inputs=ROW[:63])], signature_name="classify"),
    "INVALID_ARGUMENT",
    "feature 'inputs': Number of float values != expected.  Values size: 63 but output shape: [64]",
  ),
  (
    "int64 feature for a float one",
    lambda: _request("classify", [example(inputs=[1] * 64)], signature_name="classify"),
    "INVALID_ARGUMENT",
    "feature 'inputs' of example 0 holds int64 values but the signature parses it as float; "
    "send numbers (JSON 0.5 or 3; gRPC: float_list)",
  ),
  (
    "regress signature",
    lambda: _request("classify", [example(x=1.0)], name="regressor", signature_name="regress"),
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
  examples = [example(x=1.0), example(x=-2.5, bias=0.5), example(x=4.0)]
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
      [example(x=1.0), example(x=1.0, bias=-1.0)],
      context=example(bias=10.0),
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
  request = _request("regress", [example(x=1.0), example(x=2.0)], **spec)
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
  save_regressor(path)
  loaded = loaded_version.LoadedVersion("regressor", 1, path)
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
    export.set_method_names(path, {"nope": contract.REGRESS_METHOD_NAME})


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


def test_rest_classify_takes_json_integers_for_a_float_feature(server, pixels, probabilities):
  """The README's example: pixel values written as integers (as in its :predict example), or a
  mix of integers and floats, classify as the same floats would."""
  as_ints = pixels[:2].astype(int).tolist()
  mixed = [[float(v) if i % 2 else v for i, v in enumerate(row)] for row in as_ints]
  for rows in (as_ints, mixed):
    body = {"signature_name": "classify", "examples": [{"inputs": row} for row in rows]}
    status, result = server.request("POST", "/v1/models/digits:classify", body)
    assert status == 200, result
    scores = [[score for _, score in row] for row in result["results"]]
    np.testing.assert_allclose(scores, probabilities[:2], rtol=1e-5, atol=1e-7)
  # The regressor's features are floats too: an integer is taken as a float.
  body = {"signature_name": "regress", "examples": [{"x": 2, "bias": 1}]}
  assert server.request("POST", "/v1/models/regressor:regress", body) == (200, {"results": [5.0]})


@pytest.mark.parametrize(
  "inputs, message",
  [
    (
      ["a"] * 64,
      "feature 'inputs' in example 0: got strings (e.g. \"a\") but the signature parses it as "
      "float; send numbers (JSON 0.5 or 3; gRPC: float_list)",
    ),
    (
      [1.0] * 63 + ["x"],
      "feature 'inputs' in example 0: got strings and floats (e.g. \"x\") but the signature "
      "parses it as float; send numbers",
    ),
    ([{"b64": "aGk="}], 'got strings (e.g. "hi") but the signature parses it as float'),
  ],
  ids=["strings", "mixed", "b64"],
)
def test_rest_classify_type_mismatch_is_a_clear_invalid_argument(server, inputs, message):
  body = {"signature_name": "classify", "examples": [{"inputs": inputs}]}
  status, result = server.request("POST", "/v1/models/digits:classify", body)
  assert status == 400
  assert message in result["error"]
  assert "Graph execution error" not in result["error"]
