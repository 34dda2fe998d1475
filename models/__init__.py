"""Flax models, chosen by `config.model.name`."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from models import cnn, mlp

MODELS = {
  "cnn": cnn.CNN,
  "cnn_tiny": cnn.CNN_TINY,
  "mlp": mlp.MLP,
  "mlp_tiny": mlp.MLP_TINY,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_model(name: str, *, num_classes: int, dtype: str, dropout_rate: float) -> nn.Module:
  """Builds the model registered as `name`; raises ValueError naming the valid choices."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r} (config.model.name); choose one of {sorted(MODELS)}")
  if dtype not in DTYPES:
    raise ValueError(
      f"unknown compute dtype {dtype!r} (config.model.dtype); choose one of {sorted(DTYPES)}"
    )
  return MODELS[name](num_classes=num_classes, dropout_rate=dropout_rate, dtype=DTYPES[dtype])
