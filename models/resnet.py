"""ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", Table 1).

BatchNorm statistics live in the `batch_stats` collection. Under `jax.jit` with the batch
sharded over the data axes, the batch mean and variance are computed over the *global* batch:
XLA inserts the cross-device reduction, so every data-parallel replica normalizes alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from models import layers


def _batch_norm(train: bool, dtype: jnp.dtype, zero_init: bool = False) -> nn.BatchNorm:
  scale_init = nn.initializers.zeros_init() if zero_init else nn.initializers.ones_init()
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
  )


def _conv(features: int, kernel: int, strides: int, dtype: jnp.dtype, name: str) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(strides, strides),
    padding="SAME",
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
      (None, None, "conv_in", "conv_out"),
    ),
    name=name,
  )


class BasicBlock(nn.Module):
  features: int
  strides: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, *, train: bool):
    residual = x
    y = _conv(self.features, 3, self.strides, self.dtype, "conv_1")(x)
    y = nn.relu(_batch_norm(train, self.dtype)(y))
    y = _conv(self.features, 3, 1, self.dtype, "conv_2")(y)
    y = _batch_norm(train, self.dtype, zero_init=True)(y)
    if residual.shape != y.shape:
      residual = _conv(self.features, 1, self.strides, self.dtype, "projection")(x)
      residual = _batch_norm(train, self.dtype)(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  features: int
  strides: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, *, train: bool):
    residual = x
    y = nn.relu(_batch_norm(train, self.dtype)(_conv(self.features, 1, 1, self.dtype, "conv_1")(x)))
    y = _conv(self.features, 3, self.strides, self.dtype, "conv_2")(y)
    y = nn.relu(_batch_norm(train, self.dtype)(y))
    y = _conv(self.features * 4, 1, 1, self.dtype, "conv_3")(y)
    y = _batch_norm(train, self.dtype, zero_init=True)(y)
    if residual.shape != y.shape:
      residual = _conv(self.features * 4, 1, self.strides, self.dtype, "projection")(x)
      residual = _batch_norm(train, self.dtype)(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  num_classes: int
  stage_sizes: Sequence[int]
  block: type[nn.Module] = BasicBlock
  width: int = 64
  # Small images (CIFAR-sized) use a 3x3 stem without max-pooling; ImageNet uses 7x7 + pool.
  small_images: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool):
    x = inputs.astype(self.dtype)  # (batch, height, width, channels)
    if self.small_images:
      x = _conv(self.width, 3, 1, self.dtype, "stem")(x)
    else:
      x = _conv(self.width, 7, 2, self.dtype, "stem")(x)
    x = nn.relu(_batch_norm(train, self.dtype)(x))
    if not self.small_images:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = self.block(self.width * 2**stage, strides, self.dtype, name=f"stage_{stage}_block_{i}")(
          x, train=train
        )
    x = jnp.mean(x, axis=(1, 2))  # (batch, features)
    logits = layers.dense(self.num_classes, ("embed", "classes"), self.dtype, name="head")(x)
    return logits.astype(jnp.float32)  # (batch, num_classes)


RESNET_TINY = functools.partial(ResNet, stage_sizes=(1, 1), width=8)
RESNET18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
RESNET50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BottleneckBlock)
