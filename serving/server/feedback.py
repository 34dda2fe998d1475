"""Ground truth for logged predictions: `POST /v1/models/NAME/feedback` (this project's
extension of TF Serving's REST API) with `{"request_id": ID, "label": INT, "row": INT}` (`row`:
the example's index within a request of several rows, default 0) appends one JSON line to
`feedback.jsonl` in the model's prediction log directory (the directory of its
`logging_config` filename_prefix), the file mlops.feedback reads and joins onto the logs.

Lines are appended with one `write` on a file opened O_APPEND, so concurrent requests (and the
processes of --num_workers) never interleave within a line. The request id is not checked
against the logs: logging samples requests, and the label may arrive before the log is flushed.
"""

from __future__ import annotations

import json
import os
import re
import time

import grpc

from serving.server import log_format
from serving.server.errors import ServingError
from serving.server.model_config import ModelConfig

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def feedback_path(config: ModelConfig | None, model_name: str) -> str:
  """The feedback file of a model. Raises ServingError NOT_FOUND (no such model) or
  FAILED_PRECONDITION (the model has no prediction log to sit next to)."""
  if config is None:
    raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {model_name!r}")
  if config.logging is None:
    raise ServingError(
      grpc.StatusCode.FAILED_PRECONDITION,
      f"model {model_name} has no logging_config in the model config; feedback is written next "
      "to the prediction log, so configure one first",
    )
  directory = os.path.dirname(os.path.abspath(config.logging.filename_prefix + "x"))
  return os.path.join(directory, log_format.FEEDBACK_FILE)


def parse_entry(body: bytes) -> dict:
  """The checked feedback entry of a request body. Raises ServingError INVALID_ARGUMENT naming
  the field and the fix."""
  try:
    entry = json.loads(body or b"null")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"feedback body is not JSON: {e}") from e
  if not isinstance(entry, dict) or set(entry) - {"request_id", "label", "row"}:
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      'feedback must be a JSON object {"request_id": ..., "label": INT[, "row": INT]}',
    )
  request_id, label, row = entry.get("request_id"), entry.get("label"), entry.get("row", 0)
  if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
    raise ServingError(
      grpc.StatusCode.INVALID_ARGUMENT,
      f"feedback request_id {request_id!r} must be the x-request-id of a request "
      "(1-128 of A-Z a-z 0-9 . _ : -)",
    )
  for name, value in (("label", label), ("row", row)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"feedback {name} {value!r} must be an integer >= 0 (a class index; row: the example's "
        "index in its request)",
      )
  return {"request_id": request_id, "label": label, "row": row}


def append(path: str, entries: list[dict]) -> None:
  """Appends `entries` as JSON lines (with the time received) to `path`, in one write."""
  now_us = time.time_ns() // 1000
  text = "".join(json.dumps({**e, "time_us": e.get("time_us", now_us)}) + "\n" for e in entries)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, text.encode())
  finally:
    os.close(fd)
