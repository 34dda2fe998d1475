"""A multi-layer perceptron classifier over flattened inputs."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from models import layers


class MLP(nn.Module):
  num_classes: int
  hidden_features: Sequence[int] = (256, 256)
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = inputs.reshape((inputs.shape[0], -1)).astype(self.dtype)  # (batch, features)
    for i, features in enumerate(self.hidden_features):
      # Alternate the sharded dimension so consecutive kernels need no resharding between them.
      axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
      x = nn.relu(layers.dense(features, axes, self.dtype, name=f"hidden_{i}")(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    in_axis = "mlp" if len(self.hidden_features) % 2 else "embed"
    logits = layers.dense(self.num_classes, (in_axis, "classes"), self.dtype, name="head")(x)
    return logits.astype(jnp.float32)  # (batch, num_classes)


MLP_TINY = functools.partial(MLP, hidden_features=(32,))
