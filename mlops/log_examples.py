"""A Classify's or Regress's log record as arrays: its serialized tf.Examples -> one array per
feature, and a Classify's outputs -> each row's top class (mlops/prediction_log.py reads the
records; their format is documented there)."""

from __future__ import annotations

import numpy as np

from serving import contract
from serving.server.log_format import label_strings, top_classes

_KIND_DTYPES = {"float_list": np.float32, "int64_list": np.int64, "bytes_list": object}


def example_arrays(serialized, schema=None) -> dict[str, np.ndarray]:
  """The features of a Classify's or Regress's serialized tf.Examples (a context merged in, as
  the server fed them), one array per feature: float32, int64 or bytes objects [batch,
  values]; reshaped to `schema`'s row shape ({name: (dtype, row shape)}) where the feature's
  values fill it (so a Classify's rows line up with a Predict's). Raises ValueError for
  examples whose features differ in names, kinds or lengths (no array holds them)."""
  from serving.api_protos import example_pb2

  if serialized is None or np.ndim(serialized) != 1:
    raise ValueError("a Classify/Regress record without its 1-D `inputs` of serialized Examples")
  columns: dict[str, list] = {}
  kinds: dict[str, str] = {}
  for i, data in enumerate(serialized):
    features = example_pb2.Example.FromString(bytes(data)).features.feature
    if i and set(features) != set(columns):
      raise ValueError(f"examples with features {sorted(features)} and {sorted(columns)}")
    for name, feature in features.items():
      kind = feature.WhichOneof("kind") or "float_list"
      if kinds.setdefault(name, kind) != kind:
        raise ValueError(f"feature {name!r}: examples of kinds {kinds[name]} and {kind}")
      columns.setdefault(name, []).append(list(getattr(feature, kind).value))
  arrays = {}
  for name, rows in columns.items():
    if len({len(r) for r in rows}) != 1:
      raise ValueError(f"feature {name!r}: examples of different lengths")
    array = np.empty((len(rows), len(rows[0])), _KIND_DTYPES[kinds[name]])
    array[:] = rows
    row_shape = (schema or {}).get(name, (None, None))[1]
    fixed = row_shape is not None and None not in row_shape and -1 not in row_shape
    if fixed and int(np.prod(row_shape)) == array.shape[1]:
      array = array.reshape(len(rows), *row_shape)
    arrays[name] = array
  return arrays


def classify_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A logged Classify's `classes` (labels [batch, k]) and `scores` as `classes` (each row's
  top-scoring label, log_format.top_classes), `scores` and `class_labels` (str)."""
  classes = outputs.get(contract.CLASSIFY_OUTPUT_CLASSES)
  scores = outputs.get(contract.CLASSIFY_OUTPUT_SCORES)
  top = top_classes(classes, scores)
  read = {} if top is None else {"classes": top}
  if scores is not None:
    read["scores"] = scores
  if classes is not None:
    read["class_labels"] = label_strings(classes)
  return read
