"""The functions a SavedModel serves, written in JAX: preprocessing inside, raw inputs outside.

Each `Signature` pairs a pure JAX function `fn(variables, inputs) -> {name: array}` with the
TF input specs and polymorphic shapes it is exported under, and golden inputs for the parity
gate and the TF Serving warmup records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from serving.inference import InferenceModel
from trainer import text_data
from trainer.tasks import normalize


@dataclasses.dataclass(frozen=True)
class Signature:
  name: str
  fn: Callable[[dict, dict], dict]
  # input name -> (shape with None for polymorphic dims, numpy dtype)
  inputs: dict[str, tuple[tuple[int | None, ...], np.dtype]]
  # input name -> jax.export polymorphic shape, e.g. "b, 64"
  polymorphic_shapes: dict[str, str]
  golden_inputs: dict[str, np.ndarray]
  doc: str


def classifier_signatures(model: InferenceModel, golden: np.ndarray) -> list[Signature]:
  """`serving_default`: raw inputs (as the data source yields them) -> probabilities, classes."""
  spec = model.data_spec
  input_shape, serving_shape = tuple(spec["input_shape"]), tuple(spec["serving_input_shape"])

  def predict(variables, inputs):
    x = inputs["inputs"].reshape((-1, *input_shape))
    logits = model.model.apply(variables, normalize(x, spec["mean"], spec["std"]), train=False)
    return {
      "probabilities": jax.nn.softmax(logits),
      "classes": jnp.argmax(logits, axis=-1).astype(jnp.int32),
    }

  dims = ", ".join(str(d) for d in serving_shape)
  return [
    Signature(
      name="serving_default",
      fn=predict,
      inputs={"inputs": ((None, *serving_shape), np.dtype(np.float32))},
      polymorphic_shapes={"inputs": f"b, {dims}"},
      golden_inputs={"inputs": golden.reshape((-1, *serving_shape)).astype(np.float32)},
      doc=f"inputs float32 [batch, {dims}] (unnormalized) -> probabilities, classes",
    )
  ]


def language_model_signatures(
  model: InferenceModel, golden_tokens: np.ndarray, *, max_new_tokens: int
) -> list[Signature]:
  """`serving_default`: token ids -> log-probabilities of the next token; `generate`: greedy
  continuation of prompts by `max_new_tokens` tokens with a KV cache."""
  vocab = text_data.VOCAB_SIZE

  def next_token_log_probs(variables, inputs):
    logits = model.model.apply(variables, inputs["tokens"])[:, -1, :vocab]  # (batch, vocab)
    return {"log_probs": jax.nn.log_softmax(logits)}

  def generate(variables, inputs):
    tokens = decoding.generate(
      model.model,
      variables["params"],
      inputs["tokens"],
      jax.random.PRNGKey(0),
      max_new_tokens=max_new_tokens,
    )
    return {"tokens": tokens}

  golden = {"tokens": golden_tokens.astype(np.int32)}
  token_spec = {"tokens": ((None, None), np.dtype(np.int32))}
  return [
    Signature(
      name="serving_default",
      fn=next_token_log_probs,
      inputs=token_spec,
      polymorphic_shapes={"tokens": "b, t"},
      golden_inputs=golden,
      doc=f"tokens int32 [batch, length] (byte ids) -> log_probs float32 [batch, {vocab}]",
    ),
    Signature(
      name="generate",
      fn=generate,
      inputs=token_spec,
      polymorphic_shapes={"tokens": "b, t"},
      golden_inputs=golden,
      doc=f"tokens int32 [batch, prompt_length] -> tokens int32 [batch, {max_new_tokens}] (greedy)",
    ),
  ]
