"""End to end: accuracy on digits, TensorBoard and manifest contents, guards and retention."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import digits_cnn
from trainer import checkpointing, train
from trainer.errors import NonFiniteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _event_tags(logdir):
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(logdir)
  events.Reload()
  return events


def test_digits_reaches_97_percent(tmp_path, one_device):
  config = digits_cnn.get_config()
  config.train.num_steps = 400
  config.eval.every_steps = 400
  config.optim.warmup_steps = 50
  config.checkpoint.enabled = False
  result = train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  assert result.eval_metrics["eval/accuracy"] >= 0.97, result.eval_metrics


def test_default_make_run_config_reaches_98_percent(tmp_path, one_device):
  # Exactly what `make run` trains (on a CPU machine, one device).
  result = train.train_and_evaluate(digits_cnn.get_config(), str(tmp_path), devices=one_device)
  assert result.step == 1500
  assert result.eval_metrics["eval/accuracy"] >= 0.98, result.eval_metrics
  # The README's "~99% test accuracy", on the held-out test split.
  assert result.test_metrics["test/accuracy"] >= 0.98, result.test_metrics


def test_metrics_tensorboard_and_manifest(smoke_config, tmp_path):
  result = train.train_and_evaluate(smoke_config, str(tmp_path))
  events = _event_tags(str(tmp_path / "tensorboard"))
  scalars = set(events.Tags()["scalars"])
  for tag in (
    "train/loss",
    "train/grad_norm",
    "train/param_norm",
    "train/update_norm",
    "train/learning_rate",
    "perf/steps_per_sec",
    "perf/examples_per_sec",
    "eval/loss",
    "eval/accuracy",
  ):
    assert tag in scalars, tag
  logged_steps = [e.step for e in events.Scalars("train/loss")]
  num_steps, every = smoke_config.train.num_steps, smoke_config.train.log_every_steps
  assert logged_steps == list(range(every, num_steps + 1, every)) == sorted(result.logged_losses)
  eval_every = smoke_config.eval.every_steps
  evals = list(range(eval_every, num_steps + 1, eval_every))
  assert [e.step for e in events.Scalars("eval/accuracy")] == evals
  # The test split is scored once, at the end, apart from the validation evals.
  assert [e.step for e in events.Scalars("test/accuracy")] == [num_steps]
  assert events.Scalars("test/accuracy")[-1].value == pytest.approx(
    result.test_metrics["test/accuracy"]
  )
  assert events.Scalars("eval/accuracy")[-1].value == pytest.approx(
    result.eval_metrics["eval/accuracy"]
  )
  assert "config/text_summary" in events.Tags()["tensors"]
  hparams_files = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events")]
  assert len(hparams_files) == 1  # Hparams live in the same run as the scalars.
  content = (tmp_path / "tensorboard" / hparams_files[0]).read_bytes()
  assert b"_hparams_/experiment" in content and b"optim.learning_rate" in content

  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert manifest["config"]["model"]["name"] == "cnn_tiny"
  assert manifest["devices"]["count"] == 8 and manifest["mesh"] == {
    "data": 8,
    "fsdp": 1,
    "tensor": 1,
  }
  assert manifest["data_fingerprint"].startswith("sha256:")
  assert manifest["packages"]["jax"] == jax.__version__
  assert set(manifest["git"]) == {"commit", "dirty"}


def test_non_finite_loss_stops_and_is_never_checkpointed(smoke_config, tmp_path):
  smoke_config.optim.update(name="sgd", learning_rate=1e30, warmup_steps=0, grad_clip_norm=0.0)
  smoke_config.checkpoint.every_steps = 2
  smoke_config.train.log_every_steps = 1
  with pytest.raises(
    NonFiniteError, match=r"non-finite .*train/(loss|grad_norm).* at step (\d+)"
  ) as error:
    train.train_and_evaluate(smoke_config, str(tmp_path))
  bad_step = int(error.value.args[0].split(" at step ")[1].split(";")[0])
  saved = checkpointing.existing_steps(str(tmp_path))
  assert all(step < bad_step for step in saved), (saved, bad_step)


def test_preemption_on_a_step_without_norms_never_checkpoints_non_finite_parameters(
  smoke_config, tmp_path, monkeypatch
):
  """Step 3 is neither logged, evaluated nor saved, so it runs without the norms; its update
  (here made NaN) must still not reach the checkpoint that the preemption forces there."""
  import dataclasses

  import jax.numpy as jnp

  from tests.helpers.steps import WrappedStep
  from trainer import preemption
  from trainer.metrics import MetricWriter

  smoke_config.train.update(num_steps=10, log_every_steps=5)
  smoke_config.eval.every_steps = 10
  smoke_config.checkpoint.every_steps = 10
  monkeypatch.setattr(preemption.PreemptionWatcher, "should_stop", lambda self, step: step == 3)
  experiment = train.build_experiment(smoke_config, jax.devices()[:1])

  def nan_parameters_at_step_3(state, metrics):  # The cheap step's update at step 3 alone.
    if int(state.step) != 3:
      return state, metrics
    return state.replace(
      params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params)
    ), metrics

  experiment = dataclasses.replace(
    experiment, loop_step=WrappedStep(experiment.loop_step, after=nan_parameters_at_step_3)
  )
  checkpointer = checkpointing.Checkpointer(
    str(tmp_path), smoke_config.checkpoint, best_metric="eval/accuracy", best_mode="max"
  )
  state, iterator, _ = train._initial_state(experiment, checkpointer)
  loop = train.TrainLoop(experiment, checkpointer, MetricWriter(str(tmp_path / "tb")), 0, None)
  with pytest.raises(NonFiniteError, match="non-finite parameters at step 3"):
    loop.run(state, iterator)
  checkpointer.close()
  assert checkpointing.existing_steps(str(tmp_path)) == []


def test_keeps_last_k_plus_best_k(smoke_config, tmp_path):
  smoke_config.train.num_steps = 40
  smoke_config.checkpoint.update(every_steps=5, keep_last=2, keep_best=1)
  smoke_config.eval.every_steps = 10
  result = train.train_and_evaluate(smoke_config, str(tmp_path))
  kept = checkpointing.existing_steps(str(tmp_path))
  assert kept[-2:] == [35, 40]
  assert result.best_checkpoint_step in kept
  assert len(kept) <= 3


def test_early_stopping(smoke_config, tmp_path):
  smoke_config.train.num_steps = 200
  # Nothing improves by min_delta after the first eval.
  smoke_config.eval.update(
    every_steps=5,
    early_stopping_patience=2,
    best_metric="loss",
    best_mode="min",
    early_stopping_min_delta=1e9,
  )
  result = train.train_and_evaluate(smoke_config, str(tmp_path))
  assert result.stopped_early
  assert result.step == 15  # First eval sets the best; two more without improvement.
  assert checkpointing.existing_steps(str(tmp_path))[-1] == 15


def test_training_never_imports_tensorflow(tmp_path):
  code = (
    "import sys; from trainer import train; from configs import digits_cnn;"
    "c = digits_cnn.get_config('smoke'); c.train.num_steps = 2;"
    f"train.train_and_evaluate(c, {str(tmp_path)!r});"
    "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')];"
    "assert not bad, bad"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_early_stopping_patience_carries_across_resume(smoke_config, tmp_path):
  # Nothing improves by min_delta after the first eval.
  smoke_config.eval.update(
    every_steps=5,
    early_stopping_patience=3,
    best_metric="loss",
    best_mode="min",
    early_stopping_min_delta=1e9,
  )
  smoke_config.train.num_steps = 10  # Evals at 5 (best) and 10 (one without improvement).
  assert not train.train_and_evaluate(smoke_config, str(tmp_path)).stopped_early
  smoke_config.train.num_steps = 200
  result = train.train_and_evaluate(smoke_config, str(tmp_path))
  # Two more evals without improvement (15, 20) exhaust the patience of 3 carried over.
  assert result.stopped_early and result.step == 20


@pytest.mark.parametrize("mesh", [dict(data=-1, fsdp=1), dict(data=2, fsdp=4)])
def test_batches_gathered_on_the_devices_train_as_batches_copied_from_the_host(
  smoke_config, tmp_path, monkeypatch, mesh
):
  """The digits fit the default data.device_resident_mb: each batch is gathered on the devices
  (DeviceGather). That trains to the losses and metrics of a run whose batches are copied from
  the host (device_resident_mb=0), sharded over 8 devices."""
  from trainer.data import pipeline as input_pipeline

  gathers = []
  gather = input_pipeline.DeviceGather.__call__
  monkeypatch.setattr(
    input_pipeline.DeviceGather, "__call__", lambda self, i: gathers.append(1) or gather(self, i)
  )
  results = {}
  for budget_mb in (smoke_config.data.device_resident_mb, 0):
    smoke_config.data.device_resident_mb = budget_mb
    smoke_config.mesh.update(mesh)
    results[budget_mb] = train.train_and_evaluate(smoke_config, str(tmp_path / f"{budget_mb}"))
  assert len(gathers) == smoke_config.train.num_steps  # Every batch of the first run only.
  on_device, from_host = results.values()
  assert on_device.logged_losses == pytest.approx(from_host.logged_losses, rel=1e-6)
  assert on_device.eval_metrics == pytest.approx(from_host.eval_metrics, rel=1e-6)
  assert on_device.test_metrics == pytest.approx(from_host.test_metrics, rel=1e-6)
  assert on_device.step == from_host.step == smoke_config.train.num_steps
