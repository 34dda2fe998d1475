"""Prediction logs: TFRecord files of TF Serving's `PredictionLog` proto -> arrays, and back.

The format (what the model server's log writer must produce, issue #13; the same files TF Serving
replays as `assets.extra/tf_serving_warmup_requests`):

* A file is a TFRecord file; each record is one serialized `tensorflow.serving.PredictionLog`
  with `predict_log` set: the `PredictRequest` as received and the `PredictResponse` as sent.
* `log_metadata.model_spec` (and the response's `model_spec`, as TF Serving answers): `name`,
  `version` (the version that served the request; on an error the one it was routed to, or
  unset) and `signature_name`. The request's `model_spec` is the client's (a version, a label or
  neither). `ModelSpec` holds a version or a label, never both (a oneof), so the label that
  routed the request (named by the client or chosen by the traffic policy) travels below.
  `log_metadata.timestamp_secs`: the request's start, whole seconds.
* What `LogMetadata` has no field for travels in the logged response, under the reserved output
  key `__log_metadata__` (`METADATA_KEY`): a scalar DT_STRING tensor (`string_val[0]`) holding
  UTF-8 JSON with these keys (`METADATA_FIELDS`):
    - `request_id` (str): the client's `x-request-id` or the one the server made;
    - `version_label` (str or null): the label that routed the request;
    - `time_us` (int): the request's start, microseconds since the epoch (UTC);
    - `arm` (str or null): the traffic-split arm, null when no split applied;
    - `latency_us` (int): time from receipt to response;
    - `status_code` (int): the gRPC status code answered (0 = OK; an error record's response has
      no other outputs);
    - `format` (int): `FORMAT_VERSION` of this encoding;
    - `role` (str): "primary", or "shadow" for the mirrored copy of a request, logged under the
      primary's request id (absent in older records: primary);
    - `rpc` (str): "Predict", "Classify" or "Regress" (absent in older records: Predict).
* A Classify or Regress is logged as a PredictLog of the signature it ran (`model_spec.
  signature_name`): the request's `inputs` is the 1-D DT_STRING tensor of serialized tf.Examples
  the server fed (a context merged into each), the response's outputs the signature's (`classes`
  and `scores`, or `outputs`). That is what TF Serving's Predict takes and answers on that
  signature, so the record replays as warmup, and its metadata has the same home as a
  Predict's. `ClassifyLog` / `RegressLog` have no place for it.
  Replay tools use the request only, and output keys starting with `__` are never a model's, so
  the extra tensor breaks nothing that reads TF Serving's logs.
* Files may be rotated and named freely (`filename_prefix` + a suffix); `read_logs` reads every
  regular file in the directory, oldest name first. A writer killed mid-record (SIGKILL) leaves a
  torn last record: the reader skips it and counts it (`torn_records`).

The reader is pure Python over the TFRecord framing (8-byte length, its masked CRC-32C, payload,
payload CRC): lengths and their CRCs are checked; payload CRCs are not (no CRC-32C library is
locked, and a Python loop per byte would be the reader's whole cost), a torn payload shows as a
short read or a proto that does not parse.

The encoder (`make_record`, `RecordMetadata`, `decode_metadata`) is serving/server/log_format.py,
the server's writer serving/server/prediction_logger.py.

Feedback (ground truth) joins by request id: mlops/feedback.py (files ending in .jsonl or .csv
in a log directory are feedback, not logs).
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np
from absl import logging

from mlops import log_examples
from mlops.log_examples import example_arrays  # noqa: F401  (part of this module's API)
from serving import contract

# The record format's one definition is the server's (it writes the logs); re-exported here.
from serving.server.log_format import (  # noqa: F401
  FORMAT_VERSION,
  METADATA_FIELDS,
  METADATA_KEY,
  NOT_LOG_SUFFIXES,
  RPCS,
  RecordMetadata,
  decode_metadata,
  make_record,
  top_classes,
)

_HEADER_BYTES = 12  # uint64 length + uint32 masked CRC-32C of the length
_FOOTER_BYTES = 4  # uint32 masked CRC-32C of the payload


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C (Castagnoli) of `data` (pure Python: for short headers)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@dataclasses.dataclass
class Logs:
  """Logged requests as arrays; one entry per example row (a request of n rows gives n rows).

  Only successful records (status 0) whose inputs match the schema contribute rows; the others
  are counted.
  """

  inputs: dict[str, np.ndarray]
  outputs: dict[str, np.ndarray]
  request_id: np.ndarray  # str, per row
  row_in_request: np.ndarray  # int32: the row's index within its request
  time_us: np.ndarray  # int64
  model_name: np.ndarray  # str
  version: np.ndarray  # int64
  version_label: np.ndarray  # str
  arm: np.ndarray  # str ('' when no split applied)
  latency_us: np.ndarray  # int64
  role: np.ndarray  # str: "primary" or "shadow"
  num_records: int = 0
  torn_records: int = 0
  # status code -> count of records that answered an error.
  error_records: dict[int, int] = dataclasses.field(default_factory=dict)
  # Error records by role ("primary"/"shadow"), and the primary ones by arm ('' = no split):
  # error records have no rows, and the A/B and shadow reports need their share per arm/role.
  errors_by_role: dict[str, int] = dataclasses.field(default_factory=dict)
  errors_by_arm: dict[str, int] = dataclasses.field(default_factory=dict)
  # reason -> count of OK records whose inputs break the schema (training/serving skew).
  schema_breaks: dict[str, int] = dataclasses.field(default_factory=dict)
  # Records of another model than the one asked for, and of another RPC (`read_logs(rpc=)`).
  other_model_records: int = 0
  other_rpc_records: int = 0

  def __len__(self) -> int:
    return len(self.request_id)

  def select(self, mask: np.ndarray) -> Logs:
    """The rows where `mask` holds (counters stay those of the whole read)."""
    per_row = {
      f.name: getattr(self, f.name)[mask]
      for f in dataclasses.fields(self)
      if isinstance(getattr(self, f.name), np.ndarray)
    }
    return dataclasses.replace(
      self,
      inputs={k: v[mask] for k, v in self.inputs.items()},
      outputs={k: v[mask] for k, v in self.outputs.items()},
      **per_row,
    )


class LogError(ValueError):
  """Logs that cannot be read as asked: no files, nothing readable, another model only."""


def iter_records(path: str):
  """Yields the payloads of the complete records of one TFRecord file; returns (via
  StopIteration.value) the number of torn records at its end (0 or 1)."""
  with open(path, "rb") as f:
    while True:
      header = f.read(_HEADER_BYTES)
      if not header:
        return 0
      if len(header) < _HEADER_BYTES:
        return 1
      length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
      if masked_crc32c(length_bytes) != length_crc:
        logging.warning("%s: a record header fails its CRC; stopping there", path)
        return 1
      (length,) = struct.unpack("<Q", length_bytes)
      payload = f.read(length)
      footer = f.read(_FOOTER_BYTES)
      if len(payload) < length or len(footer) < _FOOTER_BYTES:
        return 1
      yield payload


def log_files(directory: str) -> list[str]:
  """The regular files of a log directory, by name. Raises LogError if there are none."""
  if not os.path.isdir(directory):
    raise LogError(f"--logs={directory} is not a directory; give the prediction log directory")
  files = sorted(
    os.path.join(directory, name)
    for name in os.listdir(directory)
    if not name.startswith(".")
    and not name.endswith(NOT_LOG_SUFFIXES)  # Feedback lives next to the logs.
    and os.path.isfile(os.path.join(directory, name))
  )
  if not files:
    raise LogError(f"--logs={directory} holds no log files")
  return files


def _row_schema(arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
  return {k: (v.dtype.name, tuple(v.shape[1:])) for k, v in arrays.items()}


def _schema_break(arrays, expected) -> str | None:
  """Why a request's inputs do not fit `expected` ({name: (dtype, row shape)}), None if they do."""
  if set(arrays) != set(expected):
    return f"inputs {sorted(arrays)} instead of {sorted(expected)}"
  for name, (dtype, shape) in expected.items():
    value = arrays[name]
    if value.ndim == 0:
      return f"{name}: a scalar instead of a batch"
    if value.dtype.name != dtype:
      return f"{name}: dtype {value.dtype.name} instead of {dtype}"
    # Variable-length dims (None / -1 in the schema) match any size.
    got = tuple(value.shape[1:])
    if len(got) != len(shape) or any(
      s not in (None, -1) and s != g for s, g in zip(shape, got, strict=True)
    ):
      return f"{name}: row shape {list(got)} instead of {list(shape)}"
  return None


def read_logs(
  directory: str,
  *,
  model_name: str | None = None,
  input_schema: dict[str, tuple[str, tuple[int | None, ...]]] | None = None,
  rpc: str = "Predict",
) -> Logs:
  """Reads every log file in `directory` into per-row arrays.

  `model_name`: keep only records of that model (others are counted). `input_schema`: the
  expected inputs, {name: (numpy dtype name, per-row shape)}; records that differ are counted
  as schema breaks. Without it the first OK record's inputs define the schema.
  `rpc`: read the records of that RPC ("Predict", "Classify", "Regress"; others are counted).
  A Classify's or Regress's rows are its tf.Examples' features (`log_examples.example_arrays`),
  and a Classify's outputs are `classes` (each row's top class, `top_classes`), `scores` and
  `class_labels` (every class's label, str), so a report reads them as a Predict's.
  Raises LogError when the directory holds no files or `rpc` is not one of RPCS.
  """
  from serving.api_protos import prediction_log_pb2
  from serving.server import tensors  # numpy-only TensorProto conversion (no TF on the fast path)

  if rpc not in RPCS:
    raise LogError(f"rpc {rpc!r} is not one of {list(RPCS)}")
  collected = _Collector(input_schema)
  for path in log_files(directory):
    records = iter_records(path)
    while True:
      try:
        payload = next(records)
      except StopIteration as done:
        collected.torn += done.value or 0
        break
      collected.num_records += 1
      try:
        log = prediction_log_pb2.PredictionLog.FromString(payload)
        meta = decode_metadata(log)
      except Exception as e:
        logging.warning("%s: an unreadable record (%s); skipped", path, e)
        collected.torn += 1
        continue
      if model_name and meta.model_name and meta.model_name != model_name:
        collected.other_model += 1
        continue
      if meta.rpc != rpc:
        collected.other_rpc += 1
        continue
      if meta.status_code != 0:
        collected.add_error(meta)
        continue
      predict = log.predict_log
      try:
        inputs = {k: tensors.to_ndarray(v) for k, v in predict.request.inputs.items()}
        outputs = {
          k: tensors.to_ndarray(v) for k, v in predict.response.outputs.items() if k != METADATA_KEY
        }
        if rpc != "Predict":
          inputs = log_examples.example_arrays(
            inputs.get(contract.CLASSIFY_INPUTS), collected.schema
          )
          outputs = log_examples.classify_outputs(outputs) if rpc == "Classify" else outputs
      except ValueError as e:
        collected.add_break(f"malformed tensor ({e})")
        continue
      collected.add(inputs, outputs, meta)
  return collected.finish()


class _Collector:
  """Accumulates per-record arrays and counters; concatenates once at the end."""

  def __init__(self, input_schema):
    self.schema = input_schema
    self.output_schema = None
    self.parts_in: list[dict] = []
    self.parts_out: list[dict] = []
    self.meta: list[tuple[RecordMetadata, int]] = []
    self.num_records = self.torn = self.other_model = self.other_rpc = 0
    self.errors: dict[int, int] = {}
    self.errors_by_role: dict[str, int] = {}
    self.errors_by_arm: dict[str, int] = {}
    self.breaks: dict[str, int] = {}

  def add_error(self, meta: RecordMetadata) -> None:
    self.errors[meta.status_code] = self.errors.get(meta.status_code, 0) + 1
    self.errors_by_role[meta.role] = self.errors_by_role.get(meta.role, 0) + 1
    if meta.role == "primary":
      arm = meta.arm or ""
      self.errors_by_arm[arm] = self.errors_by_arm.get(arm, 0) + 1

  def add_break(self, reason: str) -> None:
    self.breaks[reason] = self.breaks.get(reason, 0) + 1

  def add(self, inputs, outputs, meta: RecordMetadata) -> None:
    if self.schema is None and inputs:
      self.schema = _row_schema({k: v for k, v in inputs.items() if v.ndim})
    reason = _schema_break(inputs, self.schema)
    rows = {v.shape[0] for v in inputs.values()}
    if reason is None and len(rows) != 1:
      reason = f"inputs of different batch sizes {sorted(rows)}"
    if reason is None:
      if self.output_schema is None:
        self.output_schema = _row_schema(outputs)
      if _schema_break(outputs, self.output_schema) or any(
        v.shape[0] != next(iter(rows)) for v in outputs.values()
      ):
        reason = "outputs do not match the other records' outputs"
    if reason:
      self.add_break(reason)
      return
    self.parts_in.append(inputs)
    self.parts_out.append(outputs)
    self.meta.append((meta, next(iter(rows))))

  def finish(self) -> Logs:
    counts = np.array([n for _, n in self.meta], np.int64)
    total = int(counts.sum())

    def per_row(values, dtype):
      return np.repeat(np.asarray(values, dtype), counts) if total else np.zeros(0, dtype)

    def stack(parts, schema):
      return {
        k: np.concatenate([p[k] for p in parts])
        if parts
        else np.zeros((0, *[s or 0 for s in shape]), dtype)
        for k, (dtype, shape) in (schema or {}).items()
      }

    metas = [m for m, _ in self.meta]
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return Logs(
      inputs=stack(self.parts_in, self.schema),
      outputs=stack(self.parts_out, self.output_schema),
      request_id=per_row([m.request_id for m in metas], object).astype(str),
      row_in_request=(np.arange(total) - starts).astype(np.int32),
      time_us=per_row([m.time_us for m in metas], np.int64),
      model_name=per_row([m.model_name for m in metas], object).astype(str),
      version=per_row([m.version for m in metas], np.int64),
      version_label=per_row([m.version_label for m in metas], object).astype(str),
      arm=per_row([m.arm or "" for m in metas], object).astype(str),
      latency_us=per_row([m.latency_us for m in metas], np.int64),
      role=per_row([m.role for m in metas], object).astype(str),
      num_records=self.num_records,
      torn_records=self.torn,
      error_records=dict(self.errors),
      errors_by_role=dict(self.errors_by_role),
      errors_by_arm=dict(self.errors_by_arm),
      schema_breaks=dict(self.breaks),
      other_model_records=self.other_model,
      other_rpc_records=self.other_rpc,
    )


def write_records(path: str, records: list[bytes]) -> None:
  """Writes serialized records as a TFRecord file (TensorFlow's writer, so CRCs are real);
  the file appears complete or not at all (temp + rename). For tests, benches and replays."""
  import tensorflow as tf

  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.TFRecordWriter(tmp) as writer:
    for record in records:
      writer.write(record)
  os.replace(tmp, path)


def __getattr__(name: str):
  # The feedback half moved to mlops/feedback.py; its old names here still work.
  if name in ("Feedback", "read_feedback", "join_feedback"):
    from mlops import feedback

    return getattr(feedback, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
