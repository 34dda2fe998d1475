"""The Ray Data worker: a SavedModel loaded once per actor, called on batches of rows.

Each batch is cut into pieces of at most `batch_size` rows and each piece padded (with copies of
its first row) up to the next of the model server's batch sizes (serving/server/batching.py), so
the jax2tf program compiles for the same few shapes the server runs and the numbers are the
ones the server computes for a batch of that size. TensorFlow only: no JAX in the workers.
"""

from __future__ import annotations

import numpy as np

ROW_COLUMN = "row"
MODEL_NAME_COLUMN = "model_name"
MODEL_VERSION_COLUMN = "model_version"


class SavedModelPredictor:
  """Callable class for `Dataset.map_batches(compute=ActorPoolStrategy(...))`.

  Batches are pyarrow Tables with `row` (int64) and the signature's input (a fixed-size list
  column per row); results are pyarrow Tables with `row`, every output (lists for per-row
  vectors), `model_name` and `model_version`.
  """

  def __init__(
    self,
    saved_model: str,
    signature_name: str,
    input_name: str,
    row_shape: tuple[int, ...],
    input_dtype: str,
    batch_sizes: tuple[int, ...],
    model_name: str,
    model_version: int,
  ):
    import tensorflow as tf

    self._tf = tf
    self.signature = tf.saved_model.load(saved_model).signatures[signature_name]
    self.input_name = input_name
    self.row_shape = tuple(row_shape)
    self.dtype = np.dtype(input_dtype)
    self.batch_sizes = tuple(batch_sizes)
    self.model_name = model_name
    self.model_version = model_version

  def padded_size(self, rows: int) -> int:
    return next(size for size in self.batch_sizes if size >= rows)

  def predict(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs for `inputs` [rows, *row_shape], run in padded pieces of allowed sizes."""
    largest = self.batch_sizes[-1]
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(inputs), largest):
      piece = inputs[start : start + largest]
      size = self.padded_size(len(piece))
      padded = np.concatenate([piece, np.repeat(piece[:1], size - len(piece), 0)])
      outputs = self.signature(**{self.input_name: self._tf.constant(padded)})
      for name, value in outputs.items():
        parts.setdefault(name, []).append(value.numpy()[: len(piece)])
    return {name: np.concatenate(values) for name, values in sorted(parts.items())}

  def __call__(self, batch):
    import pyarrow as pa

    inputs = from_arrow(batch.column(self.input_name), self.row_shape).astype(
      self.dtype, copy=False
    )
    outputs = self.predict(inputs)
    table = {ROW_COLUMN: batch.column(ROW_COLUMN)}
    for name, value in outputs.items():
      table[name] = to_arrow(value)
    table[MODEL_NAME_COLUMN] = pa.array([self.model_name] * len(batch), pa.string())
    table[MODEL_VERSION_COLUMN] = pa.array(np.full(len(batch), self.model_version, np.int64))
    return pa.table(table)


def to_arrow(value: np.ndarray):
  """A numpy batch [rows, ...] as an Arrow column: scalars plain, per-row arrays as nested
  fixed-size lists (plain Parquet that any reader opens, unlike Ray's tensor extension)."""
  import pyarrow as pa

  if value.ndim == 1:
    return pa.array(value)
  column = pa.array(np.ascontiguousarray(value).reshape(-1))
  for size in reversed(value.shape[1:]):
    column = pa.FixedSizeListArray.from_arrays(column, size)
  return column


def from_arrow(column, row_shape: tuple[int, ...]) -> np.ndarray:
  """The inverse of `to_arrow` for a column of `row_shape` rows."""
  column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
  values = column
  for _ in row_shape:
    values = values.flatten()
  return values.to_numpy(zero_copy_only=False).reshape(len(column), *row_shape)
