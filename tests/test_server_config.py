"""The model server with a --model_config_file: several models (a language model and digits
versions 1 and 2, on TF Serving's --tensorflow_{intra,inter}_op_parallelism), labels moved by
the polled file and by HandleReloadConfigRequest (each move logged), reload base paths confined
to --model_base_path_roots, and server-side batching (merged batches answer as unbatched ones;
warmup runs every padded batch size)."""

import concurrent.futures
import os
import time

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from google.protobuf import text_format  # noqa: E402
from tensorflow_serving.apis import model_management_pb2  # noqa: E402
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402

from configs import lm as lm_config  # noqa: E402
from serving.export import exporter as export  # noqa: E402
from serving.export import loading  # noqa: E402
from tests.helpers import model_server  # noqa: E402
from tests.helpers.model_server import (  # noqa: E402
  check_outputs,
  outputs_of,
  predict_request,
  wait_for,
)
from trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return model_server.digits_export(tmp_path_factory)


@pytest.fixture(scope="module")
def pixels():
  return model_server.digits_pixels()


@pytest.fixture(scope="module")
def expected(digits, pixels):
  return model_server.jax_digits_outputs(digits[0], pixels)


def _digits_config(base, labels: dict[str, int]) -> str:
  return f"""model_config_list {{
    config {{
      name: "digits"
      base_path: "{base}"
      model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
      {" ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.items())}
    }}
  }}"""


@pytest.fixture(scope="module")
def lm_server(digits, tmp_path_factory):
  """A server of two models from a --model_config_file: a language model (int32 tokens;
  signatures serving_default and generate) and digits with versions 1 and 2 both served."""
  root = tmp_path_factory.mktemp("lm")
  for version in (1, 2):
    model_server.copy_version(digits[1], str(root / "digits"), version)
  config = lm_config.get_config("smoke")
  config.data.worker_threads = 0
  config.data.max_bytes = 60_000
  config.data.eval_every_documents = 4
  config.train.num_steps = 4
  train.train_and_evaluate(config, str(root / "run"), jax.devices()[:1])
  export.export(str(root / "run"), str(root / "models"), max_new_tokens=5)
  (root / "models.config").write_text(
    f"""model_config_list {{
      config {{ name: "lm" base_path: "{root / "models"}" model_platform: "tensorflow" }}
      config {{
        name: "digits"
        base_path: "{root / "digits"}"
        model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
        version_labels {{ key: "stable" value: 1 }}
        version_labels {{ key: "canary" value: 2 }}
      }}
    }}"""
  )
  args = [
    *model_server.QUICK_ARGS,
    f"--model_config_file={root / 'models.config'}",
    "--tensorflow_intra_op_parallelism=1",
    "--tensorflow_inter_op_parallelism=2",
  ]
  with model_server.Server(args, str(root / "server.log"), model_name="lm") as server:
    yield server, loading.load(str(root / "run")), str(root / "models" / "1")


def test_language_model_signatures_over_grpc_and_rest(lm_server):
  server, model, path = lm_server
  prompt = np.array([list(b"def main():\n  ret"), list(b"import numpy as n")], np.int32)
  response = server.predict_stub.Predict(
    predict_request(prompt, input_name="tokens", name="lm"), timeout=30
  )
  vocab = outputs_of(response)["log_probs"].shape[-1]
  expected = jax.nn.log_softmax(model.model.apply(model.variables, prompt)[:, -1, :vocab])
  np.testing.assert_allclose(outputs_of(response)["log_probs"], expected, rtol=1e-5, atol=1e-5)

  generated = tf.saved_model.load(path).signatures["generate"](tokens=tf.constant(prompt))
  response = server.predict_stub.Predict(
    predict_request(prompt, input_name="tokens", name="lm", signature_name="generate"), timeout=30
  )
  assert response.model_spec.signature_name == "generate"
  np.testing.assert_array_equal(outputs_of(response)["tokens"], generated["tokens"].numpy())
  body = {"signature_name": "generate", "inputs": {"tokens": prompt.tolist()}}
  status, result = server.request("POST", "/v1/models/lm:predict", body)
  assert status == 200, result
  assert result["outputs"] == generated["tokens"].numpy().tolist()

  body = {"signature_name": "generate", "instances": (prompt + 0.5).tolist()}
  status, result = server.request("POST", "/v1/models/lm:predict", body)
  assert status == 400
  assert "input 'tokens' holds float64 values but the signature expects int32" in result["error"]
  with pytest.raises(grpc.RpcError) as error:
    server.predict_stub.Predict(
      predict_request(prompt.astype(np.float32), input_name="tokens", name="lm"), timeout=30
    )
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert "has dtype float32 but signature serving_default expects int32" in error.value.details()
  status, metadata = server.get("/v1/models/lm/metadata")
  assert {"serving_default", "generate"} <= set(
    metadata["metadata"]["signature_def"]["signature_def"]
  )


def test_model_config_file_serves_several_models_and_versions(lm_server, pixels, expected):
  server = lm_server[0]
  versions = {}
  for spec in ({"version": 1}, {"version_label": "canary"}, {}):
    response = server.predict_stub.Predict(predict_request(pixels[:3], **spec), timeout=30)
    check_outputs(outputs_of(response), expected, slice(3))
    versions[str(spec)] = response.model_spec.version.value
  assert list(versions.values()) == [1, 2, 2]
  # TF Serving's thread flags reached TensorFlow (read back from tf.config.threading).
  assert "TensorFlow op threads: intra-op 1, inter-op 2" in server.log_text()
  status, result = server.get("/v1/models/digits")
  assert [(v["version"], v["state"]) for v in result["model_version_status"]] == [
    ("1", "AVAILABLE"),
    ("2", "AVAILABLE"),
  ]
  status, result = server.request(
    "POST", "/v1/models/digits/labels/stable:predict", {"instances": pixels[:1].tolist()}
  )
  assert status == 200 and len(result["predictions"]) == 1
  assert server.get("/v1/models/nope")[0] == 404


@pytest.fixture(scope="module")
def batching_server(digits, tmp_path_factory):
  """Digits versions 1 and 2 (labels stable=1, canary=2) from a --model_config_file read every
  second, with server-side batching (up to 32 rows; a batch waits at most 20 ms)."""
  root = tmp_path_factory.mktemp("batching")
  for version in (1, 2):
    model_server.copy_version(digits[1], str(root / "digits"), version)
  (root / "models.config").write_text(_digits_config(root / "digits", {"stable": 1, "canary": 2}))
  (root / "batching.config").write_text(
    "max_batch_size { value: 32 } batch_timeout_micros { value: 20000 } "
    "max_enqueued_batches { value: 1000 } num_batch_threads { value: 2 }"
  )
  args = [
    *model_server.QUICK_ARGS,
    f"--model_config_file={root / 'models.config'}",
    "--model_config_file_poll_wait_seconds=1",
    f"--batching_parameters_file={root / 'batching.config'}",
  ]
  with model_server.Server(args, str(root / "server.log")) as server:
    yield server, root


def _batches(server, version: int) -> tuple[float, float, float]:
  """(batches, rows, batches of one row) that server-side batching ran on digits `version`."""
  from prometheus_client.parser import text_string_to_metric_families

  values = {}
  for family in text_string_to_metric_families(server.metrics_text()):
    for sample in family.samples if family.name == "serving_batch_size" else ():
      if sample.labels["version"] == str(version) and sample.labels.get("le", "1.0") == "1.0":
        values[sample.name] = sample.value
  return tuple(values.get(f"serving_batch_size_{kind}", 0.0) for kind in ("count", "sum", "bucket"))


def test_batching_merges_concurrent_requests_and_answers_as_unbatched(
  batching_server, pixels, expected
):
  server = batching_server[0]
  before = _batches(server, 2)
  requests = [(i % 40, i % 40 + 1 + i % 3) for i in range(48)]  # 1 to 3 rows each.

  def predict(rows):
    response = server.predict_stub.Predict(predict_request(pixels[slice(*rows)]), timeout=60)
    return outputs_of(response)

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(predict, requests))
  for rows, outputs in zip(requests, answers, strict=True):
    check_outputs(outputs, expected, slice(*rows))
  batches, rows, single_rows = (b - a for a, b in zip(before, _batches(server, 2), strict=True))
  assert rows == sum(b - a for a, b in requests)
  assert batches < len(requests)  # Merged: fewer runs than requests...
  assert batches > single_rows  # ...and some of them held more than one row.


def _label_version(server, label: str) -> int:
  request = predict_request(np.zeros((1, 64), np.float32), version_label=label)
  return server.predict_stub.Predict(request, timeout=30).model_spec.version.value


def _reload(server, text: str):
  request = model_management_pb2.ReloadConfigRequest()
  text_format.Parse(text, request.config)
  return server.model_stub.HandleReloadConfigRequest(request, timeout=120)


def test_a_version_label_moves_in_a_reloaded_config(batching_server):
  server, root = batching_server
  assert _label_version(server, "canary") == 2
  # The config file is polled: moving the label there takes effect within a few polls.
  (root / "models.config").write_text(_digits_config(root / "digits", {"stable": 1, "canary": 1}))
  wait_for(lambda: _label_version(server, "canary") == 1, 30, "label moved by the config file")
  wait_for(
    lambda: "Label canary of model digits: 2 -> 1" in server.log_text(), 10, "label move logged"
  )

  response = _reload(server, _digits_config(root / "digits", {"stable": 1, "canary": 2}))
  assert response.status.error_code == 0  # HandleReloadConfigRequest takes effect at once.
  assert _label_version(server, "canary") == 2
  assert "Label canary of model digits: 1 -> 2" in server.log_text()

  with pytest.raises(grpc.RpcError) as error:
    _reload(server, _digits_config(root / "digits", {"canary": 3}))  # 3 is not available.
  assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
  assert "not available: model digits: canary=3 (labels left unchanged)" in error.value.details()
  assert _label_version(server, "canary") == 2 and _label_version(server, "stable") == 1

  request = model_management_pb2.ReloadConfigRequest(
    config=model_server_config_pb2.ModelServerConfig()
  )
  with pytest.raises(grpc.RpcError) as error:
    server.model_stub.HandleReloadConfigRequest(request, timeout=60)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert _label_version(server, "canary") == 2
  # The file (canary=1) was applied once; a reload over RPC is not undone by later reads of
  # the unchanged file. What is checked is an absence, so it takes time: 3 reads (1 s apart).
  time.sleep(3)
  assert _label_version(server, "canary") == 2


@pytest.mark.parametrize(
  "base_path",
  [
    "/etc",
    "{root}/digits/../../..",
    "{root}/../outside",
    "{root}/escape/digits",  # A symlink out of the root.
  ],
)
def test_reload_base_paths_must_lie_under_the_roots(batching_server, base_path, tmp_path):
  server, root = batching_server
  os.makedirs(tmp_path / "elsewhere" / "1", exist_ok=True)
  if not (root / "escape").exists():
    (root / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
  path = base_path.format(root=root)
  text = f'model_config_list {{ config {{ name: "evil" base_path: "{path}" }} }}'
  with pytest.raises(grpc.RpcError) as error:
    _reload(server, text)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert f"base_path {path!r} (resolved: {os.path.realpath(path)}) is not under" in (
    error.value.details()
  )
  assert "--model_base_path_roots" in error.value.details()
  assert _label_version(server, "canary") == 2  # Nothing changed.
  assert server.get("/v1/models/evil")[0] == 404


def test_warmup_runs_every_padded_batch_size(digits, tmp_path):
  """A version's warmup replays its records at every batch size the scheduler pads to, so no
  request pays for a compile (jax2tf compiles per batch size)."""
  from serving.server import batching, loaded_version

  class Recording(loaded_version.LoadedVersion):
    sizes: list[int]

    def _execute(self, signature_name, inputs):
      self.sizes.append((signature_name, len(next(iter(inputs.values())))))
      return super()._execute(signature_name, inputs)

  options = batching.BatchingOptions(max_batch_size=12, allowed_batch_sizes=(3, 8, 12))
  scheduler = batching.BatchScheduler(options)
  try:
    Recording.sizes = []
    version = Recording("digits", 1, digits[1], scheduler)
    assert version.warm_up() == 2  # One record per signature.
  finally:
    scheduler.stop()
  for signature in ("serving_default", "classify"):
    sizes = {n for name, n in Recording.sizes if name == signature}
    assert {3, 8, 12} <= sizes, (signature, Recording.sizes)


def test_negative_thread_counts_are_one_error_line(tmp_path):
  proc = model_server.run_module(
    "serving.server",
    "--port=0",
    f"--model_base_path={tmp_path}",
    "--tensorflow_inter_op_parallelism=-2",
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert errors == [
    "error: --tensorflow_inter_op_parallelism=-2 must be 0 (the default) or more"
  ], proc.stderr


MONITORING = [
  ("prometheus_config { enabled: true }", 'has no field named "enabled"'),
  ('prometheus_config { enable: true path: "metrics" }', "path 'metrics' must start with /"),
  (None, "cannot read --monitoring_config_file="),
]


@pytest.mark.parametrize("text, message", MONITORING, ids=["misspelled", "relative", "missing"])
def test_a_bad_monitoring_config_is_one_error_line(tmp_path, text, message):
  config = tmp_path / "monitoring.config"
  if text is not None:
    config.write_text(text)
  proc = model_server.run_module(
    "serving.server",
    "--port=0",
    f"--model_base_path={tmp_path}",
    f"--monitoring_config_file={config}",
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr


def test_prometheus_without_rest_is_one_error_line(tmp_path):
  config = tmp_path / "monitoring.config"
  config.write_text('prometheus_config { enable: true path: "/metrics" }')
  proc = model_server.run_module(
    "serving.server",
    "--port=0",
    f"--model_base_path={tmp_path}",
    f"--monitoring_config_file={config}",
  )
  assert proc.returncode == 1, proc.stderr
  assert "enables Prometheus metrics, which REST serves; set --rest_api_port" in proc.stderr
