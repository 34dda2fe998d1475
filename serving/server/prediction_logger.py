"""The prediction log writer: sampled Predict requests and responses as TFRecord files of
`PredictionLog` (serving/server/log_format.py; the format is documented in
mlops/prediction_log.py), one writer thread per server.

A request never waits for the disk: `submit` puts the record's parts on a bounded queue and
returns; when the queue is full the record is dropped and counted
(`serving_prediction_log_records{outcome="dropped"}`). The writer thread encodes the records,
appends them to `filename_prefix.<start µs>-<pid>-<n>.tfrecord` and flushes after every batch it
drained (what arrived within 10 ms of its first record, at most 256), so a SIGKILL loses at most what was still queued and leaves at most one torn record at
a file's end (the reader skips it). A file reaching `max_file_bytes` is closed and the next
one begins (rotation by size).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import threading
import time
from collections.abc import Mapping

import numpy as np
from absl import logging

from serving.server import log_format
from serving.server.metrics import Metrics
from serving.server.model_config import LoggingConfig

DEFAULT_MAX_FILE_BYTES = 64 << 20
DEFAULT_QUEUE_SIZE = 10_000
# Records written between flushes at most: bounds what a SIGKILL can take from a busy writer.
_MAX_BATCH = 256
# After waking for a record the writer waits this long for more: a busy server wakes it (a
# futex and a GIL hand-off that the request threads pay for) ~100 times a second, not once per
# request. Records are on disk within about this long of their request.
_GATHER_SECONDS = 0.01


@dataclasses.dataclass(frozen=True, slots=True)
class LogEntry:
  """One request to log: what `make_record` needs, unencoded (encoding is the writer's job)."""

  config: LoggingConfig
  inputs: Mapping[str, np.ndarray]
  outputs: Mapping[str, np.ndarray]
  meta: log_format.RecordMetadata
  signature_name: str
  asked: tuple[int | None, str]


class _RotatingFile:
  """A TFRecord file under `prefix` that starts a new file once `max_bytes` were written."""

  def __init__(self, prefix: str, max_bytes: int):
    if not os.path.basename(prefix):  # A bare directory: files must not start with '.'.
      prefix = os.path.join(prefix, "predict")
    self.prefix = prefix
    self.max_bytes = max_bytes
    self._writer = None
    self._written = 0
    self._count = 0

  def write(self, record: bytes) -> None:
    import tensorflow as tf

    if self._writer is None:
      os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
      # Start time first, fixed width: names sort oldest first, as the reader reads them.
      path = f"{self.prefix}.{time.time_ns() // 1000:017d}-{os.getpid()}-{self._count:05d}.tfrecord"
      self._writer = tf.io.TFRecordWriter(path)
      self._count += 1
      self._written = 0
      logging.info("Prediction log: writing %s", path)
    self._writer.write(record)
    self._written += len(record) + 16  # TFRecord framing: 12-byte header, 4-byte footer.
    if self._written >= self.max_bytes:
      self.close()

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class PredictionLogger:
  """The server's log writer. `submit` is called on the request path (never blocks, never
  raises); `close` drains the queue and closes the files (at shutdown)."""

  def __init__(
    self,
    metrics: Metrics,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    queue_size: int = DEFAULT_QUEUE_SIZE,
  ):
    self.metrics = metrics
    self.max_file_bytes = max_file_bytes
    self._queue: queue.Queue[LogEntry | None] = queue.Queue(maxsize=queue_size)
    self._files: dict[str, _RotatingFile] = {}
    self._failed_prefixes: set[str] = set()
    self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
    self._thread.start()

  @staticmethod
  def sampled(config: LoggingConfig | None) -> bool:
    """Whether this request is one of the sampled share (a fresh draw per call)."""
    return (
      config is not None and config.sampling_rate > 0 and random.random() < config.sampling_rate
    )

  def submit(self, entry: LogEntry) -> bool:
    """Queues `entry` for writing; False (and counted as dropped) when the queue is full."""
    try:
      self._queue.put_nowait(entry)
      return True
    except queue.Full:
      self.metrics.observe_log_record(entry.meta.model_name, "dropped")
      return False

  def close(self, timeout_s: float = 10.0) -> None:
    """Writes what is queued (for up to `timeout_s`), then closes every file."""
    try:
      self._queue.put(None, timeout=timeout_s)
    except queue.Full:
      logging.error("Prediction log: the writer is stuck; records still queued are lost")
      return
    self._thread.join(timeout_s)

  def _run(self) -> None:
    stopping = False
    while not stopping:
      batch = [self._queue.get()]
      if batch[0] is not None:
        time.sleep(_GATHER_SECONDS)
      while len(batch) < _MAX_BATCH:
        try:
          batch.append(self._queue.get_nowait())
        except queue.Empty:
          break
      touched = set()
      for entry in batch:
        if entry is None:
          stopping = True
          continue
        touched.add(self._write(entry))
      for prefix in touched - {None}:
        self._files[prefix].flush()
    for sink in self._files.values():
      sink.close()

  def _write(self, entry: LogEntry) -> str | None:
    """Encodes and appends one entry; returns its prefix (None when it failed: counted)."""
    prefix = entry.config.filename_prefix
    try:
      record = log_format.make_record(
        dict(entry.inputs),
        dict(entry.outputs),
        entry.meta,
        signature_name=entry.signature_name,
        asked=entry.asked,
      )
      sink = self._files.get(prefix)
      if sink is None:
        sink = self._files[prefix] = _RotatingFile(prefix, self.max_file_bytes)
      sink.write(record)
    except Exception as e:  # A full disk or a bad prefix must not kill the writer.
      if prefix not in self._failed_prefixes:  # Once per prefix, not per record.
        logging.error("Prediction log: cannot write under %s: %s", prefix, e)
        self._failed_prefixes.add(prefix)
      self.metrics.observe_log_record(entry.meta.model_name, "failed")
      return None
    self.metrics.observe_log_record(entry.meta.model_name, "written")
    return prefix
