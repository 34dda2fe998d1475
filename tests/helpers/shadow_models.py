"""Tiny SavedModels with the digits model's signature (`inputs` [n, 64] float32 ->
`probabilities`, `classes`) that misbehave as shadows: one whose input check fails on every
digits request, one that sleeps ~200 ms per request without using a CPU."""

from __future__ import annotations

import os


def export_erroring(path: str) -> str:
  """A version at `path` whose `inputs` must have 3 columns: every 64-column request errors."""
  return _export(path, columns=3, sleep_us=0)


def export_sleeping(path: str, sleep_us: int = 200_000) -> str:
  """A version at `path` that sleeps `sleep_us` (tf.data's sleep) and answers uniform rows."""
  return _export(path, columns=64, sleep_us=sleep_us)


def _export(path: str, *, columns: int, sleep_us: int) -> str:
  import tensorflow as tf
  from tensorflow.python.data.experimental.ops import testing

  class Shadow(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, columns], tf.float32, name="inputs")])
    def serve(self, inputs):
      delay = tf.constant(0, tf.int64)
      if sleep_us:
        dataset = tf.data.Dataset.range(1).apply(testing.sleep(sleep_us))
        delay = dataset.reduce(tf.constant(0, tf.int64), lambda total, x: total + x)
      probabilities = tf.fill([tf.shape(inputs)[0], 10], 0.1) + tf.cast(delay, tf.float32)
      return {
        "probabilities": probabilities,
        "classes": tf.argmax(probabilities, -1, output_type=tf.int32),
      }

  module = Shadow()
  staging = f"{path}.staging"
  tf.saved_model.save(module, staging, signatures={"serving_default": module.serve})
  os.rename(staging, path)
  return path
