"""The functions a SavedModel serves, written in JAX: preprocessing inside, raw inputs outside.

Each `Signature` pairs a pure JAX function `fn(variables, inputs) -> {name: array}` with the
TF input specs and polymorphic shapes it is exported under, and golden inputs for the parity
gate and the TF Serving warmup records. A signature that TF Serving's Classify or Regress RPC
calls takes serialized tf.Examples: TF ops at its edges parse them into `fn`'s inputs and turn
`fn`'s outputs into the method's (`classes` as strings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from serving.export.loading import InferenceModel
from trainer.data import text as text_data
from trainer.tasks import normalize

PREDICT_METHOD_NAME = "tensorflow/serving/predict"
CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"


@dataclasses.dataclass(frozen=True)
class Signature:
  name: str
  fn: Callable[[dict, dict], dict]
  # The signature's input name -> (shape with None for polymorphic dims, numpy dtype)
  inputs: dict[str, tuple[tuple[int | None, ...], np.dtype]]
  # `fn`'s input name -> jax.export polymorphic shape, e.g. "b, 64"
  polymorphic_shapes: dict[str, str]
  golden_inputs: dict[str, np.ndarray]
  doc: str
  # The SignatureDef's method_name (tf.saved_model.save writes predict; export rewrites others).
  method_name: str = PREDICT_METHOD_NAME
  # TF functions (orbax-export ServingConfig pre/postprocessors) from the signature's inputs to
  # `fn`'s and from `fn`'s outputs to the signature's; None: the identity.
  tf_preprocessor: Callable[[dict], dict] | None = None
  tf_postprocessor: Callable[[dict], dict] | None = None
  # What `fn` sees for `golden_inputs` when a preprocessor stands between them (the parity gate
  # runs `fn` on these); None: `golden_inputs` themselves.
  golden_fn_inputs: dict[str, np.ndarray] | None = None


def classifier_signatures(model: InferenceModel, golden: np.ndarray) -> list[Signature]:
  """`serving_default`: raw inputs (as the data source yields them) -> probabilities, classes.

  `classify` (for TF Serving's Classify RPC): serialized tf.Examples [batch], each with the float
  feature `inputs` holding one example's raw inputs (prod(serving_input_shape) values, row-major)
  -> `classes` (every class index as a string, in index order) and `scores` (their
  probabilities), both [batch, num_classes], as TF Estimator's classification heads exported.
  """
  spec = model.data_spec
  input_shape, serving_shape = tuple(spec["input_shape"]), tuple(spec["serving_input_shape"])
  num_classes = spec["num_classes"]

  def probabilities(variables, inputs):
    x = inputs["inputs"].reshape((-1, *input_shape))
    logits = model.model.apply(variables, normalize(x, spec["mean"], spec["std"]), train=False)
    return jax.nn.softmax(logits), logits

  def predict(variables, inputs):
    probs, logits = probabilities(variables, inputs)
    return {"probabilities": probs, "classes": jnp.argmax(logits, axis=-1).astype(jnp.int32)}

  def classify_scores(variables, inputs):
    return {"scores": probabilities(variables, inputs)[0]}

  def parse_examples(inputs):
    import tensorflow as tf

    feature = {"inputs": tf.io.FixedLenFeature(serving_shape, tf.float32)}
    return tf.io.parse_example(inputs["inputs"], feature)

  def add_class_labels(outputs):
    import tensorflow as tf

    scores = outputs["scores"]  # (batch, num_classes)
    labels = tf.constant([[str(c) for c in range(num_classes)]])  # (1, num_classes)
    return {"classes": tf.tile(labels, [tf.shape(scores)[0], 1]), "scores": scores}

  dims = ", ".join(str(d) for d in serving_shape)
  raw_golden = {"inputs": golden.reshape((-1, *serving_shape)).astype(np.float32)}
  return [
    Signature(
      name="serving_default",
      fn=predict,
      inputs={"inputs": ((None, *serving_shape), np.dtype(np.float32))},
      polymorphic_shapes={"inputs": f"b, {dims}"},
      golden_inputs=raw_golden,
      doc=f"inputs float32 [batch, {dims}] (unnormalized) -> probabilities, classes",
    ),
    Signature(
      name="classify",
      fn=classify_scores,
      inputs={"inputs": ((None,), np.dtype(object))},
      polymorphic_shapes={"inputs": f"b, {dims}"},
      golden_inputs={"inputs": float_examples("inputs", raw_golden["inputs"])},
      doc=(
        "inputs string [batch] (serialized tf.Examples, float feature 'inputs' of "
        f"{int(np.prod(serving_shape))} unnormalized values) -> classes string "
        f"[batch, {num_classes}] (class indices), scores float32 [batch, {num_classes}]"
      ),
      method_name=CLASSIFY_METHOD_NAME,
      tf_preprocessor=parse_examples,
      tf_postprocessor=add_class_labels,
      golden_fn_inputs=raw_golden,
    ),
  ]


def float_examples(key: str, values: np.ndarray) -> np.ndarray:
  """Serialized tf.Examples, one per row of `values`, each with the float feature `key` holding
  the row's values (row-major): a 1-D object array, as TF Serving feeds a Classify request."""
  import tensorflow as tf

  examples = np.empty(len(values), dtype=object)
  for i, row in enumerate(values):
    feature = tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(row)))
    example = tf.train.Example(features=tf.train.Features(feature={key: feature}))
    examples[i] = example.SerializeToString()
  return examples


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
