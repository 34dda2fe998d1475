"""Schedules, weight-decay masking, gradient accumulation and EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from trainer import steps, train
from trainer.optimizers import create_optimizer, create_schedule, decay_mask


def _optim(**overrides):
  config = base.get_base_config().optim
  config.update(overrides)
  return config


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(schedule):
  fn = create_schedule(
    _optim(learning_rate=1.0, warmup_steps=10, schedule=schedule, end_lr_factor=0.1), 110
  )
  assert float(fn(0)) == 0.0
  assert float(fn(5)) == pytest.approx(0.5)
  assert float(fn(10)) == pytest.approx(1.0)
  expected_end = 1.0 if schedule == "constant" else 0.1
  assert float(fn(110)) == pytest.approx(expected_end, abs=1e-6)
  if schedule != "constant":
    assert 0.1 < float(fn(60)) < 1.0


def test_weight_decay_skips_biases_and_scales():
  params = {
    "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    "norm": {"scale": jnp.ones(4)},
  }
  assert decay_mask(params) == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
  # With zero gradients, only weight decay moves anything, and it must move kernels alone.
  tx = create_optimizer(
    _optim(name="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.5, grad_clip_norm=0.0), 10
  ).tx
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(updates["dense"]["kernel"][0, 0]) == pytest.approx(-0.5)
  assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
  assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0.0


def test_gradient_clipping_bounds_the_update():
  params = {"w": jnp.zeros((2, 2))}
  tx = create_optimizer(
    _optim(name="sgd", learning_rate=1.0, momentum=0.0, grad_clip_norm=1.0), 10
  ).tx
  updates, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, tx.init(params), params)
  assert float(jnp.linalg.norm(updates["w"])) == pytest.approx(1.0, rel=1e-5)


def _one_step(config, batch):
  config.optim.warmup_steps = 0  # A zero first learning rate would make every update trivial.
  experiment = train.build_experiment(config, jax.devices()[:1])
  state = experiment.init_state(jax.random.PRNGKey(config.seed))
  state, metrics = experiment.train_step(state, batch)
  return jax.device_get(state), jax.device_get(metrics)


def test_gradient_accumulation_matches_the_full_batch(smoke_config):
  smoke_config.model.dropout_rate = 0.0
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.uniform(0, 16, (32, 8, 8, 1)), jnp.float32),
    "labels": jnp.asarray(rng.integers(0, 10, 32), jnp.int32),
  }
  full, full_metrics = _one_step(smoke_config, batch)
  smoke_config.optim.grad_accum_steps = 4
  accumulated, accumulated_metrics = _one_step(smoke_config, batch)
  np.testing.assert_allclose(
    accumulated_metrics["train/loss"], full_metrics["train/loss"], rtol=1e-5
  )
  np.testing.assert_allclose(
    accumulated_metrics["train/grad_norm"], full_metrics["train/grad_norm"], rtol=1e-5
  )
  initial = jax.device_get(
    train.build_experiment(smoke_config, jax.devices()[:1]).init_state(jax.random.PRNGKey(0))
  )
  assert np.abs(full.params["head"]["kernel"] - initial.params["head"]["kernel"]).max() > 1e-4
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    accumulated.params,
    full.params,
  )


def test_ema_tracks_parameters(smoke_config):
  smoke_config.optim.ema_decay = 0.9
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.uniform(0, 16, (32, 8, 8, 1)), jnp.float32),
    "labels": jnp.asarray(rng.integers(0, 10, 32), jnp.int32),
  }
  experiment = train.build_experiment(smoke_config, jax.devices()[:1])
  before = jax.device_get(experiment.init_state(jax.random.PRNGKey(0)))
  after, _ = _one_step(smoke_config, batch)
  old, new = before.params["conv_0"]["kernel"], after.params["conv_0"]["kernel"]
  ema = after.ema_params["conv_0"]["kernel"]
  assert np.abs(new - old).max() > 1e-4
  np.testing.assert_allclose(ema, 0.9 * old + 0.1 * new, rtol=1e-5, atol=1e-7)
  assert after.eval_params() is after.ema_params


def test_bfloat16_compute_keeps_float32_parameters(smoke_config):
  smoke_config.model.dtype = "bfloat16"
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.uniform(0, 16, (32, 8, 8, 1)), jnp.float32),
    "labels": jnp.asarray(rng.integers(0, 10, 32), jnp.int32),
  }
  state, metrics = _one_step(smoke_config, batch)
  assert {p.dtype for p in jax.tree.leaves(state.params)} == {np.dtype("float32")}
  assert np.isfinite(metrics["train/loss"])
  experiment = train.build_experiment(smoke_config, jax.devices()[:1])
  hlo = experiment.train_step.lower(experiment.abstract_state, batch).as_text()
  assert "bf16" in hlo


def test_the_loops_packed_step_matches_the_step_and_its_metrics_summarize(smoke_config):
  """`diagnostic_step` is `train_step` with its metrics as one vector in the order of
  `metric_names`; `loop_step` is the same step reporting the norms as 0 (same state, same other
  metrics); StepMetrics averages those vectors per name and names the first step whose loss or
  gradient norm is not finite."""
  from trainer.errors import NonFiniteError
  from trainer.metrics import StepMetrics

  smoke_config.optim.warmup_steps = 0
  experiment = train.build_experiment(smoke_config, jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.uniform(0, 16, (32, 8, 8, 1)), jnp.float32),
    "labels": jnp.asarray(rng.integers(0, 10, 32), jnp.int32),
  }
  init = lambda: experiment.init_state(jax.random.PRNGKey(0))  # noqa: E731
  _, by_name = experiment.train_step(init(), batch)
  state, packed = experiment.diagnostic_step(init(), batch)
  assert set(by_name) == set(experiment.metric_names) and packed.shape == (len(by_name),)
  expected = [float(by_name[name]) for name in experiment.metric_names]
  np.testing.assert_allclose(np.asarray(packed), expected, rtol=1e-6)

  plain_state, plain = experiment.loop_step(init(), batch)
  norms = [experiment.metric_names.index(f"train/{name}") for name in steps.NORMS]
  assert np.all(np.asarray(packed)[norms] > 0) and np.all(np.asarray(plain)[norms] == 0)
  others = [i for i in range(len(expected)) if i not in norms]
  np.testing.assert_allclose(np.asarray(plain)[others], np.asarray(packed)[others], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), plain_state.params, state.params
  )

  metrics = StepMetrics(experiment.metric_names, at_last_step=("train/learning_rate",))
  _, second = experiment.loop_step(state, batch)
  metrics.append(1, packed)
  metrics.append(2, second)
  summary = metrics.summarize()
  assert list(summary) == list(experiment.metric_names)
  loss = experiment.metric_names.index("train/loss")
  both = np.stack([np.asarray(packed), np.asarray(second)])
  assert summary["train/loss"] == pytest.approx(float(both[:, loss].mean()), rel=1e-6)
  rate = experiment.metric_names.index("train/learning_rate")
  assert summary["train/learning_rate"] == pytest.approx(float(both[1, rate]))
  assert metrics.summarize() == {}  # Cleared.

  metrics.append(7, packed)
  metrics.append(8, packed.at[experiment.metric_names.index("train/grad_norm")].set(jnp.nan))
  with pytest.raises(NonFiniteError, match=r"'train/grad_norm': nan.* at step 8"):
    metrics.summarize()
