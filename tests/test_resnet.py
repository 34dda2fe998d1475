"""ResNet: BatchNorm statistics over the global batch, carried in the state and checkpoints."""

import jax
import numpy as np
import pytest

from configs import resnet as resnet_config
from tests.helpers.checkpoints import restore_latest
from trainer import train


def _config(**mesh):
  config = resnet_config.get_config("variant=resnet_tiny,smoke")
  config.data.worker_threads = 0
  config.train.num_steps = 5
  config.train.log_every_steps = 1
  config.eval.every_steps = 5
  config.mesh.update(mesh)
  return config


def _losses(result):
  return np.array([result.logged_losses[s] for s in range(1, 6)])


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
  config = _config()
  config.checkpoint.enabled = False
  return train.train_and_evaluate(config, str(tmp_path_factory.mktemp("rn1")), jax.devices()[:1])


@pytest.mark.parametrize(
  "mesh",
  [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)],
  ids=["data8", "data2_fsdp2_tensor2"],
)
def test_resnet_meshes_match_single_device(single_device, tmp_path, mesh):
  # Per-device BatchNorm statistics would differ from one device's: this passes only if the
  # statistics are averaged over the whole (data-parallel) batch.
  config = _config(**mesh)
  config.checkpoint.enabled = False
  result = train.train_and_evaluate(config, str(tmp_path))
  np.testing.assert_allclose(_losses(result), _losses(single_device), rtol=1e-4)
  assert result.eval_metrics["eval/loss"] == pytest.approx(
    single_device.eval_metrics["eval/loss"], rel=1e-4
  )


def test_batch_stats_are_trained_and_checkpointed(tmp_path):
  config = _config()
  train.train_and_evaluate(config, str(tmp_path))
  experiment = train.build_experiment(config)
  initial = jax.device_get(experiment.init_state(jax.random.PRNGKey(0)))
  step, state, _ = restore_latest(config, tmp_path)
  assert step == 5
  assert "batch_stats" in state.model_state
  before = initial.model_state["batch_stats"]["BatchNorm_0"]["mean"]
  after = jax.device_get(state.model_state["batch_stats"]["BatchNorm_0"]["mean"])
  assert np.abs(after - before).max() > 1e-3  # Running statistics moved during training.
