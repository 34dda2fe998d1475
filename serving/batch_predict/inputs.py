"""Input files -> one Arrow table of `row` and the signature's input; outputs -> Parquet/logs.

Inputs: `.npz` (the array `input_key`, or the only array), ArrayRecord files of this project's
training format (msgpack records `{"inputs": array, ...}`, trainer/data/sources.py; decoded here
with msgpack alone so no JAX is imported), or Parquet (a column `input_key` of per-row lists).
A path may be a glob or a directory of such files.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from serving.batch_predict import predictor

# flax.serialization's msgpack extension code for numpy arrays (and for numpy scalars).
_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3


class InputError(ValueError):
  """An input that cannot be read as the model's rows; the message names it."""


def _files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if not n.startswith((".", "_")))
  else:
    files = sorted(glob.glob(os.path.expanduser(path)))
  files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise InputError(f"--input={path} matches no file")
  return files


def _msgpack_array(code: int, data: bytes):
  import msgpack

  if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    return np.frombuffer(buffer, dtype=np.dtype(dtype.decode())).reshape(shape)
  return msgpack.ExtType(code, data)


def _read_array_record(path: str, key: str) -> np.ndarray:
  import msgpack
  from array_record.python import array_record_module

  reader = array_record_module.ArrayRecordReader(path)
  try:
    records = reader.read_all()
  finally:
    reader.close()
  rows = []
  for record in records:
    example = msgpack.unpackb(record, ext_hook=_msgpack_array, raw=False)
    if key not in example:
      raise InputError(f"{path}: a record without {key!r} (it has {sorted(example)})")
    rows.append(np.asarray(example[key]))
  return np.stack(rows) if rows else np.zeros((0,))


def _read_npz(path: str, key: str) -> np.ndarray:
  with np.load(path) as data:
    if key in data.files:
      return data[key]
    if len(data.files) == 1:
      return data[data.files[0]]
    raise InputError(f"{path} has arrays {data.files}, none named {key!r}; pass --input_key")


def _read_parquet(path: str, key: str, row_shape) -> np.ndarray:
  import pyarrow.parquet as pq

  table = pq.read_table(path)
  if key not in table.column_names:
    raise InputError(f"{path} has columns {table.column_names}, none named {key!r}")
  return predictor.from_arrow(table.column(key), row_shape)


def read_inputs(path: str, key: str, row_shape: tuple[int, ...], dtype: str) -> np.ndarray:
  """All rows of the input files, [rows, *row_shape] of `dtype`. Raises InputError."""
  parts = []
  for file in _files(path):
    try:
      if file.endswith(".npz"):
        rows = _read_npz(file, key)
      elif file.endswith(".parquet"):
        rows = _read_parquet(file, key, row_shape)
      elif ".array_record" in os.path.basename(file):
        rows = _read_array_record(file, key)
      else:
        raise InputError(f"{file}: not .npz, .parquet or .array_record")
    except (OSError, ValueError, RuntimeError) as e:
      if isinstance(e, InputError):
        raise
      raise InputError(f"cannot read {file}: {e}") from e
    if rows.size and int(np.prod(rows.shape[1:])) != int(np.prod(row_shape)):
      raise InputError(
        f"{file}: rows of shape {list(rows.shape[1:])}; the model takes {list(row_shape)}"
      )
    parts.append(rows.reshape(len(rows), *row_shape).astype(dtype))
  return np.concatenate(parts)


def to_blocks(inputs: np.ndarray, key: str, rows_per_block: int) -> list:
  """Arrow tables of `row` + the input column, `rows_per_block` rows each (Ray's blocks)."""
  import pyarrow as pa

  blocks = []
  for start in range(0, len(inputs), rows_per_block):
    chunk = inputs[start : start + rows_per_block]
    rows = np.arange(start, start + len(chunk), dtype=np.int64)
    blocks.append(pa.table({predictor.ROW_COLUMN: rows, key: predictor.to_arrow(chunk)}))
  return blocks
