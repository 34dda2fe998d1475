"""The checkpoint reading API the export, evaluation, registry and gate use."""

import jax
import numpy as np
import pytest

from tests.helpers.configs import smoke_config
from trainer import checkpointing, evaluation, train
from trainer.data import DataSpec
from trainer.errors import ConfigError


def _legacy_spec(spec: DataSpec) -> dict:
  """The untyped dict checkpoints held before DataSpec (no dtype, no fingerprints)."""
  return {
    "kind": spec.kind,
    "num_classes": spec.num_classes,
    "input_shape": list(spec.input_shape),
    "serving_input_shape": list(spec.serving_input_shape),
    "mean": spec.mean,
    "std": spec.std,
  }


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory):
  """A 10-step digits run without a kept best (keep_best=0) whose checkpoints hold the old
  dict-style data spec."""
  workdir = tmp_path_factory.mktemp("legacy")
  config = smoke_config({"train.num_steps": 10, "checkpoint.keep_best": 0})
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(DataSpec, "to_json", _legacy_spec)
    result = train.train_and_evaluate(config, str(workdir), jax.devices()[:1])
  return str(workdir), result


def test_old_dict_data_spec_reads_back_typed(legacy_run):
  workdir, _ = legacy_run
  info = checkpointing.read_run_info(workdir)
  assert isinstance(info.data_spec, DataSpec)
  assert info.data_spec.input_dtype == "float32" and info.data_spec.fingerprints == {}
  assert (info.data_spec.num_classes, info.data_spec.serving_input_shape) == (10, (64,))
  model = checkpointing.restore_for_inference(workdir)
  assert model.data_spec == info.data_spec and model.step == 10


def test_without_a_kept_best_the_default_step_is_the_latest(legacy_run):
  workdir, result = legacy_run
  info = checkpointing.read_run_info(workdir)
  assert (info.steps, info.latest_step, info.best_step) == ([10], 10, None)
  assert result.best_checkpoint_step is None
  assert checkpointing.resolve_step(workdir) == checkpointing.StepChoice(10, "latest")
  with pytest.raises(ConfigError, match=r"no checkpoint .* carries eval metrics.*--step=latest"):
    checkpointing.resolve_step(workdir, "best")


def test_data_spec_round_trips_and_rejects_garbage():
  spec = DataSpec(
    kind="language_model",
    input_shape=(32,),
    input_dtype="int32",
    num_classes=259,
    fingerprints={"test": "sha256:x"},
  )
  assert DataSpec.from_json(spec.to_json()) == spec
  assert (spec.vocab_size, spec.seq_len) == (259, 32)
  with pytest.raises(ValueError, match="not a data spec"):
    DataSpec.from_json({"kind": "classification"})
  with pytest.raises(ValueError, match="unknown data kind"):
    DataSpec.from_json({"kind": "regression", "input_shape": [1], "num_classes": 1})


def test_predict_split_gives_per_example_outputs_of_the_test_split(legacy_run):
  workdir, result = legacy_run
  predictions = evaluation.predict_split(workdir, split="test")
  assert predictions.split == "test" and predictions.step == 10
  assert predictions.fingerprint is None  # The legacy spec recorded no fingerprints.
  n = len(predictions.labels)
  assert n == 270 and predictions.logits.shape == (n, 10)
  np.testing.assert_allclose(predictions.probabilities.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(
    predictions.correct, predictions.logits.argmax(-1) == predictions.labels
  )
  # The per-example outputs add up to the test metrics the run reported.
  metrics = predictions.metrics()
  assert metrics["accuracy"] == pytest.approx(result.test_metrics["test/accuracy"], abs=1e-6)
  assert metrics["loss"] == pytest.approx(result.test_metrics["test/loss"], rel=1e-5)
