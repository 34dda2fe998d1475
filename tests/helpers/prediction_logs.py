"""Prediction logs for the monitor's tests and benches: rows -> served outputs -> log files."""

from __future__ import annotations

import os

import numpy as np

from mlops import prediction_log


def served_outputs(saved_model: str, rows: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
  """What the SavedModel's serving_default answers for `rows` (TensorFlow, fixed batches)."""
  import tensorflow as tf

  signature = tf.saved_model.load(saved_model).signatures["serving_default"]
  parts: dict[str, list] = {}
  for start in range(0, len(rows), batch):
    chunk = rows[start : start + batch]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), 0)])
    for name, value in signature(inputs=tf.constant(padded)).items():
      parts.setdefault(name, []).append(value.numpy()[: len(chunk)])
  return {name: np.concatenate(v) for name, v in parts.items()}


def write_log(
  path: str,
  rows: np.ndarray,
  outputs: dict[str, np.ndarray],
  *,
  model_name: str = "digits",
  version: int = 1,
  start_us: int = 1_700_000_000_000_000,
  step_us: int = 1000,
  id_prefix: str = "r",
  rows_per_request: int = 1,
) -> list[str]:
  """Logs `rows` as requests of `rows_per_request` rows, one every `step_us`; returns the ids."""
  records, ids = [], []
  for i, start in enumerate(range(0, len(rows), rows_per_request)):
    part = slice(start, start + rows_per_request)
    request_id = f"{id_prefix}{i}"
    meta = prediction_log.RecordMetadata(
      request_id=request_id,
      time_us=start_us + i * step_us,
      model_name=model_name,
      version=version,
      latency_us=800,
    )
    records.append(
      prediction_log.make_record(
        {"inputs": rows[part]}, {k: v[part] for k, v in outputs.items()}, meta
      )
    )
    ids.append(request_id)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  prediction_log.write_records(path, records)
  return ids


def serialized_examples(rows: np.ndarray, counter: str | None = None) -> np.ndarray:
  """`rows` as serialized tf.Examples (a 1-D object array, as the server feeds a Classify), each
  row the float feature `inputs`; with `counter`, also an int64 feature of that name holding the
  row's index. Built from the protos alone (no TensorFlow runtime)."""
  from serving.api_protos import example_pb2

  serialized = np.empty(len(rows), object)
  for i, row in enumerate(rows):
    example = example_pb2.Example()
    example.features.feature["inputs"].float_list.value.extend(np.ravel(row).tolist())
    if counter is not None:
      example.features.feature[counter].int64_list.value.append(i)
    serialized[i] = example.SerializeToString()
  return serialized


def classify_record(
  rows: np.ndarray, meta: prediction_log.RecordMetadata, scores: np.ndarray | None = None
) -> bytes:
  """A logged Classify of `rows` (classes "0".."k-1" with `scores`, default uniform over 10)."""
  if scores is None:
    scores = np.full((len(rows), 10), 0.1, np.float32)
  labels = np.array([[str(c).encode() for c in range(scores.shape[1])]] * len(rows), object)
  outputs = {"classes": labels.reshape(len(rows), -1), "scores": scores}
  return prediction_log.make_record({"inputs": serialized_examples(rows)}, outputs, meta)
