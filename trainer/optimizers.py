"""optax optimizers and learning-rate schedules built from `config.optim`."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import optax

from trainer.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  tx: optax.GradientTransformation
  # step -> learning rate, for logging.
  schedule: optax.Schedule


def create_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then `config.schedule` down to peak * end_lr_factor."""
  peak, warmup = config.learning_rate, config.warmup_steps
  end = peak * config.end_lr_factor
  if config.schedule not in SCHEDULES:
    raise ConfigError(
      f"unknown schedule {config.schedule!r} (config.optim.schedule); choose one of {SCHEDULES}"
    )
  if not 0 <= warmup <= num_steps:
    raise ConfigError(
      f"config.optim.warmup_steps={warmup} must lie in [0, config.train.num_steps={num_steps}]"
    )
  decay_steps = max(num_steps - warmup, 1)
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_factor)
  elif config.schedule == "linear":
    main = optax.linear_schedule(peak, end, decay_steps)
  else:
    main = optax.constant_schedule(peak)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params) -> object:
  """True for kernels (rank >= 2); biases and norm scales are never decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> Optimizer:
  """Builds `config.name` with clipping and masked weight decay; raises ConfigError if unknown."""
  schedule = create_schedule(config, num_steps)
  factories = {
    "adamw": lambda: optax.adamw(
      schedule,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      mask=decay_mask,
    ),
    "adam": lambda: optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps),
    "lamb": lambda: optax.lamb(
      schedule,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      mask=decay_mask,
    ),
    "sgd": lambda: optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    ),
  }
  if config.name not in factories:
    raise ConfigError(
      f"unknown optimizer {config.name!r} (config.optim.name); choose one of {sorted(factories)}"
    )
  if config.grad_clip_norm < 0:
    raise ConfigError(f"config.optim.grad_clip_norm={config.grad_clip_norm} must be >= 0")
  tx = factories[config.name]()
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return Optimizer(tx=tx, schedule=schedule)
