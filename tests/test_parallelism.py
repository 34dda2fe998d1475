"""The same config trains to the same losses on 1 device and on 8-device meshes."""

import jax
import numpy as np
import pytest

from trainer import partitioning, train


def _losses(config, workdir, devices=None):
  config.train.log_every_steps = 1
  config.checkpoint.enabled = False
  result = train.train_and_evaluate(config, str(workdir), devices=devices)
  return np.array([result.logged_losses[s] for s in sorted(result.logged_losses)])


@pytest.mark.parametrize(
  "mesh",
  [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1)],
  ids=["data8", "data2_fsdp4"],
)
def test_mesh_losses_match_single_device(smoke_config, one_device, tmp_path, mesh):
  smoke_config.train.num_steps = 6
  smoke_config.train.global_batch_size = 64
  single = _losses(smoke_config.copy_and_resolve_references(), tmp_path / "one", one_device)
  smoke_config.mesh.update(mesh)
  sharded = _losses(smoke_config, tmp_path / "mesh")
  assert len(single) == 6
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  assert single[-1] < single[0]  # It trained.


def test_fsdp_shards_parameters(smoke_config):
  smoke_config.mesh.update(data=2, fsdp=4, tensor=1)
  experiment = train.build_experiment(smoke_config)
  state = experiment.init_state(jax.random.PRNGKey(0))
  partitioning.check_sharding(state, experiment.state_shardings)
  kernel = state.params["dense"]["kernel"]  # (embed, mlp): embed is split over fsdp.
  shard_rows = {shard.data.shape[0] for shard in kernel.addressable_shards}
  assert shard_rows == {kernel.shape[0] // 4}
  # Adam's moments follow their parameters.
  mu = state.opt_state[1][0].mu["dense"]["kernel"]
  assert mu.sharding.is_equivalent_to(kernel.sharding, kernel.ndim)


def test_tensor_axis_splits_hidden_width(smoke_config):
  smoke_config.mesh.update(data=4, fsdp=1, tensor=2)
  experiment = train.build_experiment(smoke_config)
  state = experiment.init_state(jax.random.PRNGKey(0))
  kernel = state.params["dense"]["kernel"]  # (embed, mlp): mlp is split over tensor.
  assert {s.data.shape for s in kernel.addressable_shards} == {
    (kernel.shape[0], kernel.shape[1] // 2)
  }


def test_check_sharding_rejects_replicated_parameters(smoke_config):
  smoke_config.mesh.update(data=2, fsdp=4, tensor=1)
  experiment = train.build_experiment(smoke_config)
  state = experiment.init_state(jax.random.PRNGKey(0))
  replicated = jax.device_put(state, partitioning.replicated(experiment.mesh))
  with pytest.raises(AssertionError, match="not sharded as planned"):
    partitioning.check_sharding(replicated, experiment.state_shardings)
