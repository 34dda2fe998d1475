"""The prediction log record: one `tensorflow.serving.PredictionLog` per logged request, its
encoder (`make_record`) and metadata decoder (`decode_metadata`). The one definition of the
format documented in mlops/prediction_log.py (which re-exports these names and reads log
directories); it lives on the server's side because the server writes it and never imports
mlops.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from serving.server import tensors

METADATA_KEY = "__log_metadata__"
METADATA_FIELDS = (
  "request_id",
  "version_label",
  "time_us",
  "arm",
  "latency_us",
  "status_code",
  "format",
  "role",
  "rpc",
)
FORMAT_VERSION = 1
# Ground truth next to a model's log files (serving/server/feedback.py, mlops/feedback.py); log
# readers skip files with these suffixes.
FEEDBACK_FILE = "feedback.jsonl"
NOT_LOG_SUFFIXES = (".jsonl", ".csv")


@dataclasses.dataclass(frozen=True)
class RecordMetadata:
  """Per-request metadata of one log record (see the module docstring)."""

  request_id: str
  time_us: int
  model_name: str = ""
  version: int = 0
  version_label: str = ""
  arm: str | None = None
  latency_us: int = 0
  status_code: int = 0
  role: str = "primary"
  rpc: str = "Predict"  # The RPC answered: "Predict", "Classify" or "Regress" (see RPCS).


# The RPCs a log records. A Classify or Regress is logged as a PredictLog of the signature it
# ran: its `inputs` tensor of serialized tf.Examples in, the signature's outputs out (what TF
# Serving's Predict on that signature takes and answers, so replaying it as warmup still works),
# which gives its metadata the same home as a Predict's.
RPCS = ("Predict", "Classify", "Regress")


def label_strings(labels: np.ndarray) -> np.ndarray:
  """Class labels (bytes, as a DT_STRING tensor holds them) as a str array of the same shape."""
  labels = np.asarray(labels)
  flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in labels.flat]
  return np.array(flat, dtype=str).reshape(labels.shape)


def top_classes(classes: np.ndarray | None, scores: np.ndarray | None) -> np.ndarray | None:
  """Each row's top-scoring class of a Classify's outputs (`classes` [batch, k] labels as bytes,
  `scores` [batch, k]): int64 when every label is an integer (the class indices this project's
  exports use as labels), else str; the argmax index without labels, the first label without
  scores; None without either."""
  if scores is None and classes is None:
    return None
  if classes is None:
    return np.argmax(np.asarray(scores).reshape(len(scores), -1), axis=1).astype(np.int64)
  classes = np.asarray(classes).reshape(len(classes), -1)
  top = (
    classes[:, 0]
    if scores is None
    else classes[np.arange(len(classes)), np.argmax(np.asarray(scores).reshape(classes.shape), 1)]
  )
  labels = label_strings(top)
  try:
    return labels.astype(np.int64)
  except ValueError:
    return labels


def decode_metadata(log) -> RecordMetadata:
  """The metadata of a parsed PredictionLog (defaults where a writer left fields out)."""
  spec = log.log_metadata.model_spec
  extra = {}
  response = log.predict_log.response
  if METADATA_KEY in response.outputs:
    extra = json.loads(response.outputs[METADATA_KEY].string_val[0])
  return RecordMetadata(
    request_id=str(extra.get("request_id", "")),
    time_us=int(extra.get("time_us", log.log_metadata.timestamp_secs * 1_000_000)),
    model_name=spec.name,
    version=spec.version.value,
    version_label=extra.get("version_label") or log.predict_log.request.model_spec.version_label,
    arm=extra.get("arm"),
    latency_us=int(extra.get("latency_us", 0)),
    status_code=int(extra.get("status_code", 0)),
    role=str(extra.get("role") or "primary"),
    rpc=str(extra.get("rpc") or "Predict"),
  )


def make_record(
  inputs: dict[str, np.ndarray],
  outputs: dict[str, np.ndarray],
  meta: RecordMetadata,
  *,
  signature_name: str = "serving_default",
  asked: tuple[int | None, str] | None = None,
) -> bytes:
  """One serialized PredictionLog in the format of mlops/prediction_log.py. `asked`: the
  client's (version, label) for the request's model_spec; None: the label that routed it."""
  from tensorflow_serving.apis import prediction_log_pb2

  # Built in place (no message copies): the writer thread encodes every logged request.
  log = prediction_log_pb2.PredictionLog()
  request, response = log.predict_log.request, log.predict_log.response
  for spec in (response.model_spec, log.log_metadata.model_spec):
    spec.name, spec.signature_name = meta.model_name, signature_name
    if meta.version:
      spec.version.value = meta.version
  request_spec = request.model_spec
  request_spec.name, request_spec.signature_name = meta.model_name, signature_name
  asked_version, asked_label = asked if asked is not None else (None, meta.version_label)
  if asked_version is not None:
    request_spec.version.value = asked_version
  elif asked_label:
    request_spec.version_label = asked_label
  for name, value in inputs.items():
    tensors.fill_tensor_proto(request.inputs[name], np.asarray(value))
  for name, value in outputs.items():
    tensors.fill_tensor_proto(response.outputs[name], np.asarray(value))
  extra = {
    "request_id": meta.request_id,
    "version_label": meta.version_label or None,
    "time_us": meta.time_us,
    "arm": meta.arm,
    "latency_us": meta.latency_us,
    "status_code": meta.status_code,
    "format": FORMAT_VERSION,
    "role": meta.role,
    "rpc": meta.rpc,
  }
  metadata_tensor = response.outputs[METADATA_KEY]
  metadata_tensor.dtype = 7  # DT_STRING
  metadata_tensor.string_val.append(json.dumps(extra).encode())
  log.log_metadata.timestamp_secs = meta.time_us // 1_000_000
  return log.SerializeToString()
