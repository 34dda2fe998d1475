"""Layers whose parameters carry logical axis names, so the mesh rules decide their sharding."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def dense(
  features: int, axes: tuple[str | None, str | None], dtype: jnp.dtype, name: str | None = None
) -> nn.Dense:
  """A float32-parameter Dense layer computing in `dtype`, kernel named `axes` (in, out)."""
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
    name=name,
  )


def conv(
  features: int, kernel_size: Sequence[int], dtype: jnp.dtype, name: str | None = None
) -> nn.Conv:
  """A float32-parameter 2-D convolution computing in `dtype`, kernel (h, w, conv_in, conv_out)."""
  return nn.Conv(
    features,
    tuple(kernel_size),
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
    ),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    name=name,
  )
