"""Pure train and eval steps for classifiers: `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trainer.train_state import TrainState


def normalize(inputs: jax.Array, mean: float, std: float) -> jax.Array:
  """The preprocessing training applies; the export runs this same function."""
  return (inputs.astype(jnp.float32) - mean) / std


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  *,
  mean: float,
  std: float,
  grad_accum_steps: int,
  ema_decay: float,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  def loss_fn(params, model_state, batch, rng):
    variables = {"params": params, **model_state}
    logits, new_model_state = model.apply(
      variables,
      normalize(batch["inputs"], mean, std),
      train=True,
      rngs={"dropout": rng},
      mutable=list(model_state),
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    accuracy = (logits.argmax(-1) == batch["labels"]).mean()
    return loss, (new_model_state, accuracy)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate_grads(state: TrainState, batch: dict, rng: jax.Array):
    """Mean gradient over `grad_accum_steps` micro-batches, scanned to bound memory."""
    if grad_accum_steps == 1:
      (loss, (model_state, accuracy)), grads = grad_fn(state.params, state.model_state, batch, rng)
      return loss, accuracy, model_state, grads

    # Micro-batch j takes rows j, j+k, j+2k, ...: every device keeps its own rows, no resharding.
    def split(x):  # (batch, ...) -> (k, batch / k, ...)
      return jnp.swapaxes(x.reshape(-1, grad_accum_steps, *x.shape[1:]), 0, 1)

    micro_batches = jax.tree.map(split, batch)

    def micro_step(carry, micro_batch_and_index):
      model_state, grad_sum, loss_sum, accuracy_sum = carry
      micro_batch, index = micro_batch_and_index
      (loss, (model_state, accuracy)), grads = grad_fn(
        state.params, model_state, micro_batch, jax.random.fold_in(rng, index)
      )
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (model_state, grad_sum, loss_sum + loss, accuracy_sum + accuracy), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (state.model_state, zeros, jnp.zeros(()), jnp.zeros(()))
    (model_state, grad_sum, loss_sum, accuracy_sum), _ = jax.lax.scan(
      micro_step, init, (micro_batches, jnp.arange(grad_accum_steps))
    )
    scale = 1.0 / grad_accum_steps
    grads = jax.tree.map(lambda g: g * scale, grad_sum)
    return loss_sum * scale, accuracy_sum * scale, model_state, grads

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    loss, accuracy, model_state, grads = accumulate_grads(state, batch, rng)
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
    metrics = {
      "train/loss": loss,
      "train/accuracy": accuracy,
      "train/grad_norm": optax.tree.norm(grads),
      "train/param_norm": optax.tree.norm(params),
      "train/update_norm": optax.tree.norm(updates),
      "train/learning_rate": schedule(state.step),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, *, mean: float, std: float) -> Callable:
  """`eval_step(state, batch) -> sums`: masked sums, so padded rows never count."""

  def eval_step(state: TrainState, batch: dict) -> dict:
    variables = {"params": state.eval_params(), **state.model_state}
    logits = model.apply(variables, normalize(batch["inputs"], mean, std), train=False)
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return {
      "loss": (loss * mask).sum(),
      "correct": ((logits.argmax(-1) == batch["labels"]) * mask).sum(),
      "count": mask.sum(),
    }

  return eval_step
