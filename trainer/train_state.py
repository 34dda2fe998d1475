"""The train state: everything a step reads and writes, and all that a checkpoint must hold."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: optax.OptState
  # Non-parameter variable collections (e.g. BatchNorm statistics); {} for stateless models.
  model_state: Any
  # Exponential moving average of params; None when config.optim.ema_decay == 0.
  ema_params: Any
  # Base key; each step folds in its step number, so the host never splits keys.
  rng: jax.Array

  def eval_params(self):
    return self.params if self.ema_params is None else self.ema_params


def init_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  *,
  rng: jax.Array,
  init_batch: dict,
  model_inputs: Callable[[dict], tuple[tuple, dict]],
  use_ema: bool,
) -> TrainState:
  """Initializes a state whose leaves stay boxed in `nn.Partitioned` (for sharding lookups).

  Meant for `jax.eval_shape` (to plan shardings) and, unboxed, for `jax.jit(out_shardings=...)`.
  """
  params_rng, dropout_rng, step_rng = jax.random.split(rng, 3)
  args, kwargs = model_inputs(init_batch)
  variables = model.init(
    {"params": params_rng, "dropout": dropout_rng}, *args, train=False, **kwargs
  )
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    model_state=variables,
    ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
    rng=step_rng,
  )
