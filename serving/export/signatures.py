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
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from serving import contract
from trainer.data import text as text_data
from trainer.data.dataset import DataSpec, normalize

PREDICT_METHOD_NAME = contract.PREDICT_METHOD_NAME
CLASSIFY_METHOD_NAME = contract.CLASSIFY_METHOD_NAME


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


class ServableModel(Protocol):
  """What the signatures read of a restored model: trainer.checkpointing.InferenceModel (not
  imported: the task classes call these builders, and checkpointing imports the tasks)."""

  model: nn.Module
  variables: dict
  data_spec: DataSpec


def classifier_signatures(model: ServableModel, golden: np.ndarray) -> list[Signature]:
  """`serving_default`: raw inputs (as the data source yields them) -> probabilities, classes.

  `classify` (for TF Serving's Classify RPC): serialized tf.Examples [batch], each with the float
  feature `inputs` holding one example's raw inputs (prod(serving_input_shape) values, row-major)
  -> `classes` (every class index as a string, in index order) and `scores` (their
  probabilities), both [batch, num_classes], as TF Estimator's classification heads exported.
  """
  spec = model.data_spec
  input_shape, serving_shape = spec.input_shape, spec.serving_input_shape
  num_classes = spec.num_classes

  def probabilities(variables, inputs):
    x = inputs["inputs"].reshape((-1, *input_shape))
    logits = model.model.apply(variables, normalize(x, spec.mean, spec.std), train=False)
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
      name=contract.DEFAULT_SIGNATURE,
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


# What a language model's signatures take and give, for their descriptions and the README.
TOKEN_CONTRACT = (
  f"Token ids are the bytes of UTF-8 text (0-255); {text_data.BOS_ID} is BOS, "
  f"{text_data.EOS_ID} EOS, {text_data.PAD_ID} PAD. Prompts need no BOS (send the text's "
  f"bytes), may differ in length: right-pad the shorter ones with PAD ({text_data.PAD_ID}); "
  "each decodes exactly as it would alone. A continuation ends at its first EOS; ids after it "
  "are to be dropped."
)


def prompt_lengths(tokens: jax.Array) -> jax.Array:
  """Each right-padded prompt's length: the index of its first PAD, or the width (at least 1)."""
  is_pad = tokens == text_data.PAD_ID
  width = tokens.shape[1]
  lengths = jnp.where(is_pad.any(axis=1), jnp.argmax(is_pad, axis=1), width)
  return jnp.maximum(lengths, 1).astype(jnp.int32)


def ragged_golden_prompts(golden_tokens: np.ndarray) -> np.ndarray:
  """Golden prompts of lengths 1, 6, 11, ... (cycling below the width), right-padded with PAD
  (the parity gate then covers ragged batches), of byte ids only."""
  tokens = golden_tokens.astype(np.int32).copy()
  # Prompts are text: a BOS or EOS the held-out rows hold becomes a newline.
  tokens[tokens >= text_data.BYTE_VOCAB] = ord("\n")
  width = tokens.shape[1]
  for row, length in enumerate(1 + (np.arange(len(tokens)) * 5) % width):
    tokens[row, length:] = text_data.PAD_ID
  return tokens


def language_model_signatures(
  model: ServableModel, golden_tokens: np.ndarray, *, max_new_tokens: int
) -> list[Signature]:
  """`serving_default`: token ids -> log-probabilities of each prompt's next token; `generate`:
  greedy continuation by `max_new_tokens` tokens with a KV cache; `sample`: the same with
  per-row temperature, top-k and seed; `generate_text`: text in, greedy text out."""
  vocab = model.data_spec.vocab_size

  def next_token_log_probs(variables, inputs):
    tokens = inputs["tokens"]
    logits = model.model.apply(variables, tokens)[:, :, :vocab]  # (batch, length, vocab)
    last = (prompt_lengths(tokens) - 1)[:, None, None]
    return {"log_probs": jax.nn.log_softmax(jnp.take_along_axis(logits, last, axis=1)[:, 0])}

  def continue_prompts(variables, tokens, **sampling):
    return decoding.generate(
      model.model,
      variables["params"],
      tokens,
      sampling.pop("keys", jax.random.PRNGKey(0)),
      max_new_tokens=max_new_tokens,
      lengths=prompt_lengths(tokens),
      vocab_size=vocab,
      **sampling,
    )

  def generate(variables, inputs):
    return {"tokens": continue_prompts(variables, inputs["tokens"])}

  def sample(variables, inputs):
    keys = jax.vmap(jax.random.PRNGKey)(inputs["seed"])
    tokens = continue_prompts(
      variables,
      inputs["tokens"],
      keys=keys,
      temperature=inputs["temperature"],
      top_k=inputs["top_k"],
    )
    return {"tokens": tokens}

  prompts = ragged_golden_prompts(golden_tokens)
  rows = len(prompts)
  token_spec = {"tokens": ((None, None), np.dtype(np.int32))}
  per_row = {"temperature": np.float32, "top_k": np.int32, "seed": np.int32}
  out = f"tokens int32 [batch, {max_new_tokens}]"
  return [
    Signature(
      name=contract.DEFAULT_SIGNATURE,
      fn=next_token_log_probs,
      inputs=token_spec,
      polymorphic_shapes={"tokens": "b, t"},
      golden_inputs={"tokens": prompts},
      doc=f"tokens int32 [batch, length] -> log_probs float32 [batch, {vocab}] of the token "
      f"after each prompt. {TOKEN_CONTRACT}",
    ),
    Signature(
      name="generate",
      fn=generate,
      inputs=token_spec,
      polymorphic_shapes={"tokens": "b, t"},
      golden_inputs={"tokens": prompts},
      doc=f"tokens int32 [batch, prompt_length] -> {out} (greedy). {TOKEN_CONTRACT}",
    ),
    Signature(
      name="sample",
      fn=sample,
      inputs={**token_spec, **{k: ((None,), np.dtype(t)) for k, t in per_row.items()}},
      polymorphic_shapes={"tokens": "b, t", **{k: "b" for k in per_row}},
      golden_inputs={
        "tokens": prompts,
        "temperature": np.resize(np.float32([0.0, 0.8, 1.5]), rows),
        "top_k": np.resize(np.int32([0, 0, 5, 1]), rows),
        "seed": np.arange(rows, dtype=np.int32),
      },
      doc=f"tokens int32 [batch, prompt_length], temperature float32 [batch] (0: greedy), "
      f"top_k int32 [batch] (0: all tokens), seed int32 [batch] -> {out}; the same seed gives "
      f"the same continuation. {TOKEN_CONTRACT}",
    ),
    _text_signature(generate, prompts, max_new_tokens),
  ]


def _text_signature(generate: Callable, prompts: np.ndarray, max_new_tokens: int) -> Signature:
  """`generate_text`: UTF-8 strings in, the greedy continuation's bytes (cut at EOS) out."""

  def text_to_tokens(inputs):
    import tensorflow as tf

    chars = tf.strings.bytes_split(inputs["text"])  # (batch, None) one-byte strings
    ids = tf.cast(tf.reshape(tf.io.decode_raw(chars.flat_values, tf.uint8), [-1]), tf.int32)
    ragged = tf.RaggedTensor.from_row_splits(ids, chars.row_splits)
    return {"tokens": ragged.to_tensor(default_value=text_data.PAD_ID)}

  def tokens_to_text(outputs):
    import tensorflow as tf

    tokens = outputs["tokens"]
    before_eos = tf.cumsum(tf.cast(tokens == text_data.EOS_ID, tf.int32), axis=1) == 0
    byte_strings = tf.constant([bytes([i]) for i in range(text_data.BYTE_VOCAB)])
    chars = tf.gather(byte_strings, tf.clip_by_value(tokens, 0, text_data.BYTE_VOCAB - 1))
    chars = tf.where(before_eos & (tokens < text_data.BYTE_VOCAB), chars, "")
    return {"text": tf.strings.reduce_join(chars, axis=1), "tokens": tokens}

  texts = np.array(
    [bytes(row[row != text_data.PAD_ID].astype(np.uint8)) for row in prompts], dtype=object
  )
  return Signature(
    name="generate_text",
    fn=generate,
    inputs={"text": ((None,), np.dtype(object))},
    polymorphic_shapes={"tokens": "b, t"},
    golden_inputs={"text": texts},
    doc=f"text string [batch] (UTF-8, non-empty; no BOS) -> text string [batch] (the greedy "
    f"continuation's bytes up to EOS, at most {max_new_tokens}; decode as UTF-8 with "
    "replacement, a multi-byte character may be cut), tokens int32 "
    f"[batch, {max_new_tokens}]",
    tf_preprocessor=text_to_tokens,
    tf_postprocessor=tokens_to_text,
    golden_fn_inputs={"tokens": prompts},
  )
