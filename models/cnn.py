"""A small convolutional classifier for low-resolution images (digits, CIFAR-sized inputs)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from models import layers


class CNN(nn.Module):
  num_classes: int
  conv_features: Sequence[int] = (32, 64)
  dense_features: int = 128
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = inputs.astype(self.dtype)  # (batch, height, width, channels)
    for i, features in enumerate(self.conv_features):
      x = nn.relu(layers.conv(features, (3, 3), self.dtype, name=f"conv_{i}")(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # (batch, height/2, width/2, features)
    x = x.reshape((x.shape[0], -1))  # (batch, height/2 * width/2 * features)
    x = nn.relu(layers.dense(self.dense_features, ("embed", "mlp"), self.dtype, name="dense")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = layers.dense(self.num_classes, ("mlp", "classes"), self.dtype, name="head")(x)
    return logits.astype(jnp.float32)  # (batch, num_classes)


CNN_TINY = functools.partial(CNN, conv_features=(8, 16), dense_features=32)
