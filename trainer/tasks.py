"""What a model is trained to do: its inputs, its loss, and the metrics reported for it.

A task reduces a batch to weighted *sums* (loss, correct predictions, weight). Train and eval
steps share them: the train step divides by the total weight (exact under gradient accumulation,
whatever the number of real tokens in each micro-batch), and eval adds them up over batches
before dividing, so padded rows and masked tokens never count.

Everything that depends on the kind of data lives in the task classes, chosen once from the
`DataSpec` by `for_spec`: the init batch, tokens per example (throughput), per-example outputs
(evaluation), the golden inputs of the export's parity gate and the serving signatures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainer.data import pipeline
from trainer.data.dataset import (
  CLASSIFICATION,
  LANGUAGE_MODEL,
  Dataset,
  DataSpec,
  normalize,
)

if TYPE_CHECKING:  # The export side (TensorFlow) is never imported by training.
  from serving.export.signatures import Signature

# Tokens of each golden prompt of a language model's parity gate (prompts are cut to this).
_GOLDEN_PROMPT_TOKENS = 16


class Task(Protocol):
  # Names of the metrics `metrics()` returns, e.g. ("loss", "accuracy").
  metric_names: tuple[str, ...]
  # Tokens per example for throughput metrics (language models); None for other tasks.
  tokens_per_example: int | None
  spec: DataSpec

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    """Positional and keyword arguments for `model.apply` after the variables."""

  def init_batch(self) -> dict:
    """A one-example batch of the right shapes and dtypes, for `model.init`."""

  def sums(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Weighted sums over the batch: at least `loss` and `weight`."""

  def metrics(self, sums: dict) -> dict[str, jax.Array]:
    """Metrics from (possibly accumulated) sums, keyed by `metric_names`."""

  def per_example(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Per-row outputs for paired tests (evaluation.predict_split): at least `loss` (the
    row's summed loss), `correct` and `weight` (what the row counts for), each (batch,)."""

  def golden_inputs(self, dataset: Dataset | None, count: int) -> np.ndarray:
    """`count` inputs for the parity gate: the test split's first examples (validation's when
    there is no test split), or seeded random ones when the data is not at hand."""

  def serving_signatures(self, model: Any, golden: np.ndarray, **options) -> list[Signature]:
    """The SavedModel signatures of an InferenceModel (serving.export.signatures); imports
    the export side, so training never calls it."""


def _row_weights(batch: dict, shape: tuple[int, ...]) -> jax.Array:
  """1 for real rows, 0 for the padding that eval adds to fill its last batch."""
  mask = batch.get("mask")
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - 1)), shape)


def _held_out_inputs(dataset: Dataset, count: int) -> np.ndarray:
  source = dataset.test if dataset.test is not None else dataset.validation
  return pipeline.take(source, np.arange(min(count, len(source))))["inputs"]


class ClassificationTask:
  metric_names = ("loss", "accuracy")
  tokens_per_example = None

  def __init__(self, spec: DataSpec):
    self.spec = spec
    self.mean, self.std = spec.mean, spec.std
    self.input_shape = spec.input_shape

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

  def per_example(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
    labels = batch["labels"]
    return {
      "logits": outputs,
      "probabilities": jax.nn.softmax(outputs),
      "labels": labels,
      "loss": optax.softmax_cross_entropy_with_integer_labels(outputs, labels),
      "correct": (outputs.argmax(-1) == labels).astype(jnp.float32),
      "weight": jnp.ones(labels.shape, jnp.float32),
    }

  def golden_inputs(self, dataset: Dataset | None, count: int) -> np.ndarray:
    if dataset is not None:
      return _held_out_inputs(dataset, count)
    rng = np.random.default_rng(0)
    return (self.mean + self.std * rng.random((count, *self.input_shape))).astype(np.float32)

  def serving_signatures(self, model: Any, golden: np.ndarray, **options) -> list[Signature]:
    from serving.export import signatures

    return signatures.classifier_signatures(model, golden)


class LanguageModelTask:
  """Next-token prediction over packed rows; `loss_mask` drops cross-document targets."""

  metric_names = ("loss", "perplexity", "accuracy")

  def __init__(self, spec: DataSpec):
    self.spec = spec
    self.seq_len = spec.seq_len
    self.tokens_per_example = spec.seq_len

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

  def per_example(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
    targets = batch["targets"]
    weights = batch["loss_mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), targets)
    return {
      "loss": (loss * weights).sum(-1),
      "correct": ((outputs.argmax(-1) == targets) * weights).sum(-1),
      "weight": weights.sum(-1),
    }

  def golden_inputs(self, dataset: Dataset | None, count: int) -> np.ndarray:
    length = min(_GOLDEN_PROMPT_TOKENS, self.seq_len)
    if dataset is not None:
      return _held_out_inputs(dataset, count)[:, :length]
    return np.random.default_rng(0).integers(0, 256, (count, length)).astype(np.int32)

  def serving_signatures(self, model: Any, golden: np.ndarray, **options) -> list[Signature]:
    from serving.export import signatures

    return signatures.language_model_signatures(model, golden, **options)


_TASKS = {CLASSIFICATION: ClassificationTask, LANGUAGE_MODEL: LanguageModelTask}


def for_spec(spec: DataSpec) -> Task:
  """The task a dataset's examples call for (DataSpec validates the kind)."""
  return _TASKS[spec.kind](spec)
