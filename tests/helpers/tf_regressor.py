"""A TF-built model of tf.Example signatures for the Classify, Regress and MultiInference tests.

Features `x` and `bias` (floats, bias default 0). Regress signatures: `regress` (2x + bias,
[batch]), `serving_default` (3x + bias, [batch, 1]), `one_output_for_all` (one value for the
batch: a wrong output). Classify: `classify` (scores [x, -x], no classes). Predict: `predict`.
"""

import tensorflow as tf

from serving import contract
from serving.export import exporter


class _Regressor(tf.Module):
  def _parse(self, inputs):
    features = {
      "x": tf.io.FixedLenFeature([], tf.float32),
      "bias": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    }
    return tf.io.parse_example(inputs, features)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def regress(self, inputs):
    parsed = self._parse(inputs)
    return {"outputs": 2.0 * parsed["x"] + parsed["bias"]}  # (batch,)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def regress_column(self, inputs):
    parsed = self._parse(inputs)
    return {"outputs": (3.0 * parsed["x"] + parsed["bias"])[:, None]}  # (batch, 1)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def one_output_for_all(self, inputs):
    return {"outputs": tf.reduce_sum(self._parse(inputs)["x"], keepdims=True)}  # (1,)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def classify(self, inputs):
    x = self._parse(inputs)["x"]
    return {"scores": tf.stack([x, -x], axis=1)}  # (batch, 2)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
  def predict(self, inputs):
    return {"outputs": self._parse(inputs)["x"]}


def save_regressor(path: str) -> None:
  """Writes the model as a SavedModel at `path`, with TF Serving's method names."""
  module = _Regressor()
  signatures = {
    "serving_default": module.regress_column,
    "regress": module.regress,
    "one_output_for_all": module.one_output_for_all,
    "classify": module.classify,
    "predict": module.predict,
  }
  tf.saved_model.save(module, path, signatures=signatures)
  methods = {name: contract.REGRESS_METHOD_NAME for name in signatures if name != "predict"}
  methods["classify"] = contract.CLASSIFY_METHOD_NAME
  exporter.set_method_names(path, methods)
