"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trainer.tasks import Task
from trainer.train_state import TrainState

# What every train step reports beside the task's own metrics (train/<task metric>).
DIAGNOSTICS = ("grad_norm", "param_norm", "update_norm", "learning_rate")
# The diagnostics that cost a pass over the parameters each (~9% of a 3 ms CPU step): a step
# built with `norms=False` reports them as 0, and the loop runs the full step only where it reads
# metrics back (trainer/loop.py), so they are logged as the value at the logging step.
NORMS = ("grad_norm", "param_norm", "update_norm")


def train_metric_names(task: Task) -> tuple[str, ...]:
  """The keys of a train step's metrics, in the order `pack_metrics` packs them."""
  return tuple(f"train/{name}" for name in (*task.metric_names, *DIAGNOSTICS))


def pack_metrics(
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]], names: tuple[str, ...]
) -> Callable[[TrainState, dict], tuple[TrainState, jax.Array]]:
  """`train_step` returning its metrics as one float32 vector in the order of `names`.

  What the training loop runs: one output buffer per step instead of one per metric (a cheaper
  dispatch), and a logging interval is read back as one (steps, metrics) array without a stack
  compiled for each interval length.
  """

  def packed_step(state: TrainState, batch: dict) -> tuple[TrainState, jax.Array]:
    state, metrics = train_step(state, batch)
    if set(metrics) != set(names):
      raise ValueError(f"train step metrics {sorted(metrics)} are not {sorted(names)}")
    return state, jnp.stack([metrics[name].astype(jnp.float32) for name in names])

  return packed_step


def make_train_step(
  model: nn.Module,
  task: Task,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  *,
  grad_accum_steps: int,
  ema_decay: float,
  norms: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (state, metrics)`; `norms=False` reports `NORMS` as 0 without
  computing them (the same state either way)."""

  def loss_fn(params, model_state, batch, rng):
    args, kwargs = task.model_inputs(batch)
    outputs, new_model_state = model.apply(
      {"params": params, **model_state},
      *args,
      train=True,
      rngs={"dropout": rng},
      mutable=list(model_state),
      **kwargs,
    )
    sums = task.sums(outputs, batch)
    return sums["loss"], (new_model_state, sums)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def summed_grads(state: TrainState, batch: dict, rng: jax.Array):
    """Gradient of the loss *sum* and the task's sums, over `grad_accum_steps` micro-batches."""
    if grad_accum_steps == 1:
      grads, (model_state, sums) = grad_fn(state.params, state.model_state, batch, rng)
      return grads, model_state, sums

    # Micro-batch j takes rows j, j+k, j+2k, ...: every device keeps its own rows, no resharding.
    def split(x):  # (batch, ...) -> (k, batch / k, ...)
      return jnp.swapaxes(x.reshape(-1, grad_accum_steps, *x.shape[1:]), 0, 1)

    def micro_step(carry, micro_batch_and_index):
      model_state, grad_sum, sums_total = carry
      micro_batch, index = micro_batch_and_index
      grads, (model_state, sums) = grad_fn(
        state.params, model_state, micro_batch, jax.random.fold_in(rng, index)
      )
      add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
      return (model_state, add(grad_sum, grads), add(sums_total, sums)), None

    micro_batches = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    sums_shape = jax.eval_shape(lambda: grad_fn(state.params, state.model_state, first, rng)[1][1])
    init = (
      state.model_state,
      jax.tree.map(jnp.zeros_like, state.params),
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
    )
    (model_state, grads, sums), _ = jax.lax.scan(
      micro_step, init, (micro_batches, jnp.arange(grad_accum_steps))
    )
    return grads, model_state, sums

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    grads, model_state, sums = summed_grads(state, batch, rng)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = optax.incremental_update(params, ema_params, step_size=1.0 - ema_decay)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      model_state=model_state,
      ema_params=ema_params,
    )
    norm = optax.tree.norm if norms else lambda tree: jnp.zeros((), jnp.float32)
    diagnostics = {
      "grad_norm": norm(grads),
      "param_norm": norm(params),
      "update_norm": norm(updates),
      "learning_rate": schedule(state.step),
    }
    metrics = {**task.metrics(sums), **{k: diagnostics[k] for k in DIAGNOSTICS}}
    return new_state, {f"train/{k}": v for k, v in metrics.items()}

  return train_step


def make_eval_step(model: nn.Module, task: Task) -> Callable[[TrainState, dict], dict]:
  """`eval_step(state, batch) -> sums`; padded rows carry `mask` 0 and never count."""

  def eval_step(state: TrainState, batch: dict) -> dict:
    args, kwargs = task.model_inputs(batch)
    variables = {"params": state.eval_params(), **state.model_state}
    outputs = model.apply(variables, *args, train=False, **kwargs)
    return task.sums(outputs, batch)

  return eval_step


def params_finite(state: TrainState) -> jax.Array:
  """Whether every parameter of `state` is finite (a bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(state.params)]
  return jnp.all(jnp.stack(leaves))
