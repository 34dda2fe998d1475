"""Flax models, chosen by `config.model.name`."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import cnn, mlp, resnet, transformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Vocabularies are padded to a multiple of this, so the output matmul tiles evenly on
# accelerators (the extra ids are never targets and learn to score low).
VOCAB_MULTIPLE = 128


def _classifier(factory) -> Callable[[ml_collections.ConfigDict, int], nn.Module]:
  def build(config: ml_collections.ConfigDict, num_outputs: int) -> nn.Module:
    return factory(
      num_classes=num_outputs, dropout_rate=config.dropout_rate, dtype=DTYPES[config.dtype]
    )

  return build


def _resnet(factory) -> Callable[[ml_collections.ConfigDict, int], nn.Module]:
  def build(config: ml_collections.ConfigDict, num_outputs: int) -> nn.Module:
    return factory(num_classes=num_outputs, dtype=DTYPES[config.dtype])

  return build


def _language_model(factory) -> Callable[[ml_collections.ConfigDict, int], nn.Module]:
  def build(config: ml_collections.ConfigDict, num_outputs: int) -> nn.Module:
    if config.remat not in transformer.REMAT_POLICIES:
      raise ValueError(
        f"unknown remat policy {config.remat!r} (config.model.remat); choose one of "
        f"{sorted(transformer.REMAT_POLICIES)}"
      )
    vocab = -(-num_outputs // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return factory(vocab_size=vocab, remat=config.remat, dtype=DTYPES[config.dtype])

  return build


# name -> builder(config.model, number of outputs: classes or vocabulary size).
MODELS = {
  "cnn": _classifier(cnn.CNN),
  "cnn_tiny": _classifier(cnn.CNN_TINY),
  "mlp": _classifier(mlp.MLP),
  "mlp_tiny": _classifier(mlp.MLP_TINY),
  "resnet_tiny": _resnet(resnet.RESNET_TINY),
  "resnet18": _resnet(resnet.RESNET18),
  "resnet50": _resnet(resnet.RESNET50),
  "lm_tiny": _language_model(transformer.LM_TINY),
  "lm_125m": _language_model(transformer.LM_125M),
  "lm_350m": _language_model(transformer.LM_350M),
  "lm_760m": _language_model(transformer.LM_760M),
  "lm_1.3b": _language_model(transformer.LM_1_3B),
}


def get_model(config: ml_collections.ConfigDict, *, num_outputs: int) -> nn.Module:
  """Builds `config.name`; raises ValueError naming the valid choices for bad settings."""
  if config.name not in MODELS:
    raise ValueError(
      f"unknown model {config.name!r} (config.model.name); choose one of {sorted(MODELS)}"
    )
  if config.dtype not in DTYPES:
    raise ValueError(
      f"unknown compute dtype {config.dtype!r} (config.model.dtype); choose one of {sorted(DTYPES)}"
    )
  return MODELS[config.name](config, num_outputs)
