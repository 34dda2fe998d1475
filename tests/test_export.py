"""Export to a TF SavedModel: parity with JAX, layout for TF Serving, errors leave nothing behind."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")

from configs import lm as lm_config  # noqa: E402
from serving.export import exporter as export  # noqa: E402
from serving.export import loading, parity  # noqa: E402
from tests.helpers.configs import smoke_config  # noqa: E402
from trainer import train  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """A digits smoke run trained on a (data=2, fsdp=4) mesh of 8 fake devices."""
  workdir = tmp_path_factory.mktemp("digits")
  train.train_and_evaluate(smoke_config({"mesh.data": 2, "mesh.fsdp": 4}), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def digits_export(digits_run, tmp_path_factory):
  base = tmp_path_factory.mktemp("models") / "digits"
  return export.export(digits_run, str(base))


def _listing(path):
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_exported_classifier_matches_jax(digits_run, digits_export):
  assert digits_export.version == 1 and os.path.basename(digits_export.path) == "1"
  model = loading.load(digits_run)
  from sklearn import datasets

  pixels = datasets.load_digits().data[:50].astype(np.float32)  # Raw 0..16 values, as clients send.
  served = tf.saved_model.load(digits_export.path).signatures["serving_default"](
    inputs=tf.constant(pixels)
  )
  images = pixels.reshape(-1, 8, 8, 1) / 16.0  # The normalization training applied.
  logits = model.model.apply(model.variables, images, train=False)
  np.testing.assert_allclose(
    served["probabilities"].numpy(), jax.nn.softmax(logits), rtol=1e-5, atol=1e-7
  )
  np.testing.assert_array_equal(served["classes"].numpy(), np.argmax(logits, -1))


def test_assets_extra_hold_warmup_and_manifest(digits_export):
  from tensorflow_serving.apis import prediction_log_pb2

  extra = os.path.join(digits_export.path, "assets.extra")
  records = list(tf.data.TFRecordDataset(os.path.join(extra, "tf_serving_warmup_requests")))
  requests = [
    prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request for r in records
  ]
  assert [r.model_spec.signature_name for r in requests] == ["serving_default", "classify"]
  assert [d.size for d in requests[0].inputs["inputs"].tensor_shape.dim] == [2, 64]
  assert requests[1].inputs["inputs"].dtype == tf.string.as_datatype_enum  # Serialized Examples.
  assert [d.size for d in requests[1].inputs["inputs"].tensor_shape.dim] == [2]
  with open(os.path.join(extra, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["checkpoint_step"] == 20
  assert "eval/accuracy" in manifest["eval_metrics"]
  assert manifest["data_fingerprint"].startswith("sha256:")
  assert set(manifest["git"]) == {"commit", "dirty"}
  assert (
    manifest["export"]["calling_convention_version"]
    == jax.config.jax_export_calling_convention_version
  )
  assert manifest["export"]["jax"] == jax.__version__


def test_saved_model_cli_lists_the_signature(digits_export):
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  out = subprocess.run(
    [cli, "show", "--all", "--dir", digits_export.path], capture_output=True, text=True, timeout=120
  ).stdout
  signature = out[out.index("signature_def['serving_default']") :]
  for line in (
    "inputs['inputs'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 64)",
    "outputs['classes'] tensor_info:\n        dtype: DT_INT32\n        shape: (-1)",
    "outputs['probabilities'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 10)",
    "Method name is: tensorflow/serving/predict",
  ):
    assert line in signature, line


def test_export_of_an_8_device_checkpoint_in_a_1_device_process(digits_run, tmp_path):
  base = tmp_path / "models"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "serving.export",
      f"--workdir={digits_run}",
      f"--export_base={base}",
      "--step=best",
      "--version=3",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported step 20" in proc.stdout
  assert _listing(base) == ["3"]


def test_versions_count_up_and_are_never_overwritten(digits_run, tmp_path):
  base = str(tmp_path / "models")
  assert export.export(digits_run, base).version == 1
  assert export.export(digits_run, base, step="20").version == 2
  with pytest.raises(ConfigError, match=r"models/2 already exists; versions are never overwritten"):
    export.export(digits_run, base, version=2)
  assert _listing(base) == ["1", "2"]


def test_parity_gate_rejects_a_corrupted_export(digits_run, tmp_path, monkeypatch):
  original = export._save_saved_model

  def save_wrong_weights(model, signature_list, path, platforms):
    corrupted = jax.tree.map(lambda x: x * 1.01, model.variables)
    original(dataclasses.replace(model, variables=corrupted), signature_list, path, platforms)

  monkeypatch.setattr(export, "_save_saved_model", save_wrong_weights)
  base = tmp_path / "models"
  with pytest.raises(
    parity.ParityError,
    match=r"relative error .* exceeds 1e-05 \(float32\); worst element \(\d+, \d+\): SavedModel .*, JAX ",
  ):
    export.export(digits_run, str(base))
  assert _listing(base) == []  # No version, no temporary directory.


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(workdir="/nonexistent/run"), r"--workdir=/nonexistent/run does not exist"),
    (dict(step="7"), r"--step=7 is not a saved step; choose latest, best or one of \[10, 20\]"),
    (dict(version=0), r"--version=0 must be a positive integer"),
  ],
)
def test_bad_arguments_leave_nothing(digits_run, tmp_path, kwargs, message):
  base = tmp_path / "models"
  kwargs = {"workdir": digits_run, **kwargs}
  with pytest.raises(ConfigError, match=message):
    export.export(kwargs.pop("workdir"), str(base), **kwargs)
  assert _listing(base) == []


def test_workdir_without_checkpoints(tmp_path):
  (tmp_path / "run").mkdir()
  with pytest.raises(ConfigError, match="holds no complete checkpoint"):
    export.export(str(tmp_path / "run"), str(tmp_path / "models"))


def test_unwritable_export_base(digits_run, tmp_path):
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(ConfigError, match=r"cannot create --export_base=.*file/models"):
    export.export(digits_run, str(tmp_path / "file" / "models"))


def test_cli_errors_and_tf_serving_compatibility(digits_export, tmp_path):
  def run(*args):
    return subprocess.run(
      [sys.executable, "-m", "serving.export", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
    )

  missing = run("--workdir=/nonexistent", f"--export_base={tmp_path}")
  assert (
    missing.returncode == 1 and "error: --workdir=/nonexistent does not exist" in missing.stderr
  )
  old = run("--check_tf_serving=2.19", f"--saved_model={digits_export.path}")
  assert old.returncode == 2 and "NO: TF Serving 2.19 cannot run" in old.stdout
  assert "--calling_convention_version=9" in old.stdout
  new = run("--check_tf_serving=2.21", f"--saved_model={digits_export.path}")
  assert new.returncode == 0 and "YES" in new.stdout
  assert "--xla_cpu_compilation_enabled=true" in new.stdout


def test_older_calling_convention_runs_on_older_servers(digits_run, tmp_path):
  from serving.export import compatibility

  result = export.export(digits_run, str(tmp_path), calling_convention_version=9)
  assert compatibility.xla_call_module_versions(result.path) == [9]
  assert compatibility.check_saved_model(result.path, "2.16").compatible
  assert not compatibility.check_saved_model(result.path, "2.15").compatible


def test_bfloat16_model_passes_the_bfloat16_gate(tmp_path):
  config = smoke_config({"model.dtype": "bfloat16", "train.num_steps": 10})
  train.train_and_evaluate(config, str(tmp_path / "run"), jax.devices()[:1])
  result = export.export(str(tmp_path / "run"), str(tmp_path / "models"))
  worst = result.parity["serving_default/probabilities"]
  assert worst <= parity.TOLERANCE["bfloat16"]


def test_language_model_export(tmp_path):
  config = lm_config.get_config("smoke")
  config.data.worker_threads = 0
  config.data.max_bytes = 60_000
  config.data.eval_every_documents = 4
  config.train.num_steps = 4
  train.train_and_evaluate(config, str(tmp_path / "run"), jax.devices()[:1])
  result = export.export(str(tmp_path / "run"), str(tmp_path / "models"), max_new_tokens=5)
  assert result.signatures == ["serving_default", "generate"]
  assert result.parity["generate/tokens"] == 0.0
  model = loading.load(str(tmp_path / "run"))
  loaded = tf.saved_model.load(result.path)
  prompt = np.array([list(b"def main():\n  ret")], np.int32)  # Any batch and length serve.
  log_probs = loaded.signatures["serving_default"](tokens=tf.constant(prompt))["log_probs"].numpy()
  expected = jax.nn.log_softmax(model.model.apply(model.variables, prompt)[:, -1, :259])
  np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)
  generated = loaded.signatures["generate"](tokens=tf.constant(prompt))["tokens"].numpy()
  from models import decoding

  np.testing.assert_array_equal(
    generated,
    decoding.generate(
      model.model, model.variables["params"], prompt, jax.random.PRNGKey(0), max_new_tokens=5
    ),
  )
