"""What a model is trained to do: its inputs, its loss, and the metrics reported for it.

A task reduces a batch to weighted *sums* (loss, correct predictions, weight). Train and eval
steps share them: the train step divides by the total weight (exact under gradient accumulation,
whatever the number of real tokens in each micro-batch), and eval adds them up over batches
before dividing, so padded rows and masked tokens never count.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import optax

from trainer.data.sources import Dataset


def normalize(inputs: jax.Array, mean: float, std: float) -> jax.Array:
  """The preprocessing classification training applies; the export runs this same function."""
  return (inputs.astype(jnp.float32) - mean) / std


class Task(Protocol):
  # Names of the metrics `metrics()` returns, e.g. ("loss", "accuracy").
  metric_names: tuple[str, ...]

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    """Positional and keyword arguments for `model.apply` after the variables."""

  def init_batch(self) -> dict:
    """A one-example batch of the right shapes and dtypes, for `model.init`."""

  def sums(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Weighted sums over the batch: at least `loss` and `weight`."""

  def metrics(self, sums: dict) -> dict[str, jax.Array]:
    """Metrics from (possibly accumulated) sums, keyed by `metric_names`."""


def _row_weights(batch: dict, shape: tuple[int, ...]) -> jax.Array:
  """1 for real rows, 0 for the padding that eval adds to fill its last batch."""
  mask = batch.get("mask")
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - 1)), shape)


class ClassificationTask:
  metric_names = ("loss", "accuracy")

  def __init__(self, dataset: Dataset):
    self.mean, self.std = dataset.mean, dataset.std
    self.input_shape = dataset.input_shape

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    return (normalize(batch["inputs"], self.mean, self.std),), {}

  def init_batch(self) -> dict:
    return {"inputs": jnp.zeros((1, *self.input_shape), jnp.float32)}

  def sums(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
    labels = batch["labels"]
    weights = _row_weights(batch, labels.shape)
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    return {
      "loss": (loss * weights).sum(),
      "correct": ((outputs.argmax(-1) == labels) * weights).sum(),
      "weight": weights.sum(),
    }

  def metrics(self, sums: dict) -> dict[str, jax.Array]:
    weight = jnp.maximum(sums["weight"], 1.0)
    return {"loss": sums["loss"] / weight, "accuracy": sums["correct"] / weight}


class LanguageModelTask:
  """Next-token prediction over packed rows; `loss_mask` drops cross-document targets."""

  metric_names = ("loss", "perplexity", "accuracy")

  def __init__(self, dataset: Dataset):
    self.seq_len = dataset.input_shape[0]

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    return (batch["inputs"],), {
      "positions": batch["positions"],
      "segment_ids": batch["segment_ids"],
    }

  def init_batch(self) -> dict:
    tokens = jnp.zeros((1, self.seq_len), jnp.int32)
    return {"inputs": tokens, "positions": tokens, "segment_ids": tokens}

  def sums(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
    targets = batch["targets"]
    weights = batch["loss_mask"].astype(jnp.float32) * _row_weights(batch, targets.shape)
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), targets)
    return {
      "loss": (loss * weights).sum(),
      "correct": ((outputs.argmax(-1) == targets) * weights).sum(),
      "weight": weights.sum(),
    }

  def metrics(self, sums: dict) -> dict[str, jax.Array]:
    weight = jnp.maximum(sums["weight"], 1.0)
    loss = sums["loss"] / weight
    return {"loss": loss, "perplexity": jnp.exp(loss), "accuracy": sums["correct"] / weight}


def for_dataset(dataset: Dataset) -> Task:
  """The task a dataset's examples call for."""
  if dataset.kind == "language_model":
    return LanguageModelTask(dataset)
  return ClassificationTask(dataset)
