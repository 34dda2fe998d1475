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
from mlops import model_card  # noqa: E402
from serving.export import exporter as export  # noqa: E402
from serving.export import loading, parity  # noqa: E402
from tests.helpers.configs import smoke_config  # noqa: E402
from trainer import train  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Steps the digits run saves: its best step (by the inverted metric below) and its latest.
BEST_STEP, LATEST_STEP = 10, 20


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """A digits smoke run trained on a (data=2, fsdp=4) mesh of 8 fake devices, checkpointed at
  steps 10 and 20. Its best checkpoint is ranked by the *highest* validation loss, so the
  best step (10: loss falls while training) differs from the latest (20) and a test can tell
  which one export took."""
  workdir = tmp_path_factory.mktemp("digits")
  config = smoke_config(
    {"mesh.data": 2, "mesh.fsdp": 4, "eval.best_metric": "loss", "eval.best_mode": "max"}
  )
  result = train.train_and_evaluate(config, str(workdir))
  assert (result.best_checkpoint_step, result.step) == (BEST_STEP, LATEST_STEP)
  return str(workdir)


@pytest.fixture(scope="module")
def digits_export(digits_run, tmp_path_factory):
  base = tmp_path_factory.mktemp("models") / "digits"
  return export.export(digits_run, str(base))


def _listing(path):
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_exported_classifier_matches_jax(digits_run, digits_export):
  assert digits_export.version == 1 and os.path.basename(digits_export.path) == "1"
  # Export takes the best checkpoint by default when the run kept one.
  assert (digits_export.step, digits_export.step_reason) == (BEST_STEP, "best")
  model = loading.load(digits_run, BEST_STEP)
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
  assert manifest["checkpoint_step"] == BEST_STEP
  assert "eval/accuracy" in manifest["eval_metrics"]
  assert manifest["data_fingerprint"].startswith("sha256:")
  fingerprints = manifest["data_spec"]["fingerprints"]
  assert set(fingerprints) == {"train", "validation", "test"}
  assert len(set(fingerprints.values())) == 3
  assert set(manifest["git"]) == {"commit", "dirty"}
  assert (
    manifest["export"]["calling_convention_version"]
    == jax.config.jax_export_calling_convention_version
  )
  assert manifest["export"]["jax"] == jax.__version__
  # The count readers use instead of loading TensorFlow is the SavedModel's own.
  variables = os.path.join(digits_export.path, "variables", "variables")
  listed = tf.train.list_variables(variables)
  counted = sum(int(np.prod(s)) for n, s in listed if n != "_CHECKPOINTABLE_OBJECT_GRAPH")
  assert manifest["parameter_count"] == counted > 0
  assert model_card.parameter_count(digits_export.path) == counted  # The fallback agrees.


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


@pytest.mark.parametrize(
  "step_flag, message",
  [
    ("--step=best", f"exported step {BEST_STEP} (the best checkpoint; --step=latest for the last)"),
    ("--step=latest", f"exported step {LATEST_STEP} (the latest checkpoint)"),
  ],
)
def test_export_of_an_8_device_checkpoint_in_a_1_device_process(
  digits_run, tmp_path, step_flag, message
):
  base = tmp_path / "models"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "serving.export",
      f"--workdir={digits_run}",
      f"--export_base={base}",
      step_flag,
      "--version=3",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert message in proc.stdout
  assert _listing(base) == ["3"]


def test_versions_count_up_and_are_never_overwritten(digits_run, tmp_path):
  base = str(tmp_path / "models")
  assert export.export(digits_run, base).version == 1
  second = export.export(digits_run, base, step="20")
  assert (second.version, second.step, second.step_reason) == (2, 20, "requested")
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
  from models import decoding
  from trainer.data import text as text_data

  config = lm_config.get_config("smoke")
  config.data.worker_threads = 0
  config.data.max_bytes = 60_000
  config.data.eval_every_documents = 4
  config.train.num_steps = 4
  train.train_and_evaluate(config, str(tmp_path / "run"), jax.devices()[:1])
  result = export.export(str(tmp_path / "run"), str(tmp_path / "models"), max_new_tokens=5)
  assert result.signatures == ["serving_default", "generate", "sample", "generate_text"]
  assert result.parity["generate/tokens"] == result.parity["sample/tokens"] == 0.0
  model = loading.load(str(tmp_path / "run"))
  vocab = model.data_spec.vocab_size
  signatures = tf.saved_model.load(result.path).signatures
  prompt = np.array([list(b"def main():\n  ret")], np.int32)  # Any batch and length serve.
  log_probs = signatures["serving_default"](tokens=tf.constant(prompt))["log_probs"].numpy()
  expected = jax.nn.log_softmax(model.model.apply(model.variables, prompt)[:, -1, :vocab])
  np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)

  def alone(tokens):
    return decoding.generate(
      model.model,
      model.variables["params"],
      np.asarray([tokens], np.int32),
      jax.random.PRNGKey(0),
      max_new_tokens=5,
      vocab_size=vocab,
    )[0]

  # Ragged prompts, right-padded with PAD, each continue as they would alone.
  texts = [b"d", b"impor", b"def main("]
  padded = np.full((3, 9), text_data.PAD_ID, np.int32)
  for row, text in enumerate(texts):
    padded[row, : len(text)] = list(text)
  generated = signatures["generate"](tokens=tf.constant(padded))["tokens"].numpy()
  for row, text in enumerate(texts):
    np.testing.assert_array_equal(generated[row], alone(list(text)), err_msg=text)
  # Text in, text out: the same continuation as bytes, cut at EOS.
  served_text = signatures["generate_text"](text=tf.constant(texts))["text"].numpy()
  for row, text in enumerate(served_text):
    tokens = list(generated[row])
    cut = tokens[: tokens.index(text_data.EOS_ID)] if text_data.EOS_ID in tokens else tokens
    assert text == bytes(t for t in cut if t < 256)

  def sample(seeds, temperature):
    return signatures["sample"](
      tokens=tf.constant(padded),
      temperature=tf.constant([temperature] * 3, tf.float32),
      top_k=tf.constant([0, 0, 0], tf.int32),
      seed=tf.constant(seeds, tf.int32),
    )["tokens"].numpy()

  np.testing.assert_array_equal(sample([1, 2, 3], 0.0), generated)  # Temperature 0 is greedy.
  hot = sample([1, 2, 3], 1.5)
  np.testing.assert_array_equal(hot, sample([1, 2, 3], 1.5))  # A fixed seed repeats.
  assert not np.array_equal(hot, sample([4, 5, 6], 1.5))
  with open(os.path.join(result.path, "assets.extra", "manifest.json")) as f:
    docs = json.load(f)["signatures"]
  assert f"right-pad the shorter ones with PAD ({text_data.PAD_ID})" in docs["generate"]
