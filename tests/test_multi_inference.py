"""TF Serving's MultiInference: several Classify/Regress signatures of one version on the same
tf.Examples, answered as the RPCs one at a time answer them, with TF Serving's status codes and
messages for bad requests; served by the model server in a subprocess, and through the router."""

import pytest

pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from tensorflow_serving.apis import (  # noqa: E402
  classification_pb2,
  inference_pb2,
  regression_pb2,
)

from serving import contract  # noqa: E402
from tests.helpers import model_server  # noqa: E402
from tests.helpers.tf_examples import example  # noqa: E402
from tests.helpers.tf_regressor import save_regressor  # noqa: E402

CLASSIFY, REGRESS = contract.CLASSIFY_METHOD_NAME, contract.REGRESS_METHOD_NAME
EXAMPLES = [example(x=1.0), example(x=-2.5, bias=0.5), example(x=4.0)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  base = tmp_path_factory.mktemp("models") / "regressor"
  save_regressor(str(base / "1"))
  args = [*model_server.QUICK_ARGS, "--model_name=regressor", f"--model_base_path={base}"]
  log = str(tmp_path_factory.mktemp("logs") / "server.log")
  with model_server.Server(args, log, model_name="regressor") as server:
    yield server


def _request(*tasks, examples=EXAMPLES, version=None):
  """A MultiInferenceRequest of (signature_name, method_name[, model name]) tasks."""
  request = inference_pb2.MultiInferenceRequest()
  for signature_name, method_name, *name in tasks:
    task = request.tasks.add(method_name=method_name)
    task.model_spec.name = name[0] if name else "regressor"
    task.model_spec.signature_name = signature_name
  if version is not None:
    request.tasks[0].model_spec.version.value = version
  request.input.example_list.examples.extend(examples)
  return request


def _alone(server, signature_name, method_name):
  """The result the signature's own RPC (Classify or Regress) answers for EXAMPLES."""
  kind = classification_pb2.ClassificationRequest if method_name == CLASSIFY else regression_pb2.RegressionRequest  # fmt: skip
  request = kind()
  request.model_spec.name, request.model_spec.signature_name = "regressor", signature_name
  request.input.example_list.examples.extend(EXAMPLES)
  rpc = server.predict_stub.Classify if method_name == CLASSIFY else server.predict_stub.Regress
  return rpc(request, timeout=30).result


def test_every_task_answers_as_its_own_rpc(server):
  tasks = [("regress", REGRESS), ("classify", CLASSIFY), ("", REGRESS)]
  response = server.predict_stub.MultiInference(_request(*tasks, version=1), timeout=30)
  assert len(response.results) == 3
  for (signature_name, method_name), result in zip(tasks, response.results, strict=True):
    field = "classification_result" if method_name == CLASSIFY else "regression_result"
    assert result.WhichOneof("result") == field
    assert getattr(result, field) == _alone(server, signature_name, method_name)
    assert result.model_spec.name == "regressor" and result.model_spec.version.value == 1
    assert result.model_spec.signature_name == (signature_name or "serving_default")
  regressions = [r.value for r in response.results[0].regression_result.regressions]
  assert regressions == [2.0, -4.5, 8.0]  # 2x + bias: the model ran, not an empty answer.
  scores = [[c.score for c in e.classes] for e in response.results[1].classification_result.classifications]  # fmt: skip
  assert scores == [[1.0, -1.0], [-2.5, 2.5], [4.0, -4.0]]


BAD = [
  ("no task", _request(), "INVALID_ARGUMENT", "MultiInferenceRequest has no tasks"),
  (
    "empty model name",
    _request(("regress", REGRESS), ("classify", CLASSIFY, "")),
    "INVALID_ARGUMENT",
    "Found ModelSpec with an empty model name.",
  ),
  (
    "two models",
    _request(("regress", REGRESS), ("classify", CLASSIFY, "other")),
    "INVALID_ARGUMENT",
    "All ModelSpecs in a MultiInferenceRequest must access the same model name.",
  ),
  (
    "a signature twice",  # "" is serving_default.
    _request(("serving_default", REGRESS), ("", REGRESS)),
    "INVALID_ARGUMENT",
    "Duplicate evaluation of signature: serving_default",
  ),
  (
    "a Predict method",
    _request(("regress", REGRESS), ("predict", "tensorflow/serving/predict")),
    "UNIMPLEMENTED",
    "Unsupported signature method_name: tensorflow/serving/predict",
  ),
  (
    "unknown signature",
    _request(("regress", REGRESS), ("nope", CLASSIFY)),
    "INVALID_ARGUMENT",
    "Requested signature not found in model graph: nope",
  ),
  (
    "a regress signature asked to classify",
    _request(("regress", CLASSIFY)),
    "INVALID_ARGUMENT",
    "Expected classification signature method_name to be tensorflow/serving/classify",
  ),
  (
    "a wrong output",
    _request(("regress", REGRESS), ("one_output_for_all", REGRESS)),
    "INVALID_ARGUMENT",
    "Input batch size did not match output batch size: 3 vs. 1",
  ),
  (
    "no examples",
    _request(("regress", REGRESS), examples=[]),
    "INVALID_ARGUMENT",
    "Input is empty.",
  ),
  (
    "unknown version",
    _request(("regress", REGRESS), version=7),
    "NOT_FOUND",
    "Specific(regressor, 7)",
  ),
]


@pytest.mark.parametrize("request_, code, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_tf_serving_status(server, request_, code, message):
  with pytest.raises(grpc.RpcError) as error:
    server.predict_stub.MultiInference(request_, timeout=30)
  assert error.value.code().name == code, error.value.details()
  assert message in error.value.details()


def test_the_router_forwards_it_as_it_came(server, tmp_path):
  tasks = [("regress", REGRESS), ("classify", CLASSIFY)]
  direct = server.predict_stub.MultiInference(_request(*tasks), timeout=30)
  router = model_server.Server(
    [f"--backend=127.0.0.1:{server.grpc_port}"],
    str(tmp_path / "router.log"),
    model_name="regressor",
    module="serving.router",
  )
  with router:
    response, call = router.predict_stub.MultiInference.with_call(_request(*tasks), timeout=30)
  assert response == direct
  assert "x-request-id" in dict(call.trailing_metadata())
