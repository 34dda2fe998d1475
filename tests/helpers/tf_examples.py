"""tf.train.Example builders for the Classify/Regress tests."""

import numpy as np


def example(**features):
  """A tf.Example of float (float values), int64 (ints) or bytes (str/bytes) features."""
  import tensorflow as tf

  example = tf.train.Example()
  for name, value in features.items():
    values = list(np.ravel(value)) if isinstance(value, list | np.ndarray) else [value]
    feature = example.features.feature[name]
    if isinstance(values[0], str | bytes):
      feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
    elif isinstance(values[0], int | np.integer):
      feature.int64_list.value.extend(int(v) for v in values)
    else:
      feature.float_list.value.extend(float(v) for v in values)
  return example


def labels_and_scores(result):
  """(labels, scores array) of a ClassificationResult, example by class."""
  labels = [[c.label for c in e.classes] for e in result.classifications]
  return labels, np.array([[c.score for c in e.classes] for e in result.classifications])
