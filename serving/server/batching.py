"""Server-side batching, as TF Serving's `--enable_batching`: concurrent requests to the same
signature are merged along the batch dimension, run once, and their rows handed back.

One scheduler serves every model (TF Serving's shared batch scheduler): `num_batch_threads`
threads take batches from per-signature queues. A batch runs when it is full (`max_batch_size`
rows), when its oldest request has waited `batch_timeout_micros`, or at once when a thread is
free and the timeout is 0. A request that does not fit the open batch starts a new one; with
`max_enqueued_batches` batches already waiting it is refused with UNAVAILABLE, so a overloaded
server sheds load instead of queueing without bound.

Requests are merged only when everything but their batch dimension agrees (dtype and the other
dimensions of every input), so a batched answer is the unbatched one: requests whose shapes
differ (say, prompts of different lengths) go to different queues. Signatures whose inputs and
outputs do not all lead with a batch dimension of unknown size run unbatched.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
from absl import logging

from serving.server.errors import ServingError, check_deadline, deadline_exceeded

# Defaults of TF Serving's BatchingParameters (SharedBatchScheduler::QueueOptions).
DEFAULT_MAX_BATCH_SIZE = 1000
DEFAULT_MAX_ENQUEUED_BATCHES = 10


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
  batch_timeout_micros: int = 0
  max_enqueued_batches: int = DEFAULT_MAX_ENQUEUED_BATCHES
  num_batch_threads: int = os.cpu_count() or 1
  # Batches are padded (with copies of their first row) up to the next of these sizes, so the
  # model only ever sees a few shapes. Increasing; the last must equal max_batch_size. Empty:
  # powers of two and max_batch_size (see `batch_sizes`).
  allowed_batch_sizes: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")
    if self.batch_timeout_micros < 0:
      raise ValueError(f"batch_timeout_micros is {self.batch_timeout_micros}; it must be >= 0")
    sizes = self.allowed_batch_sizes
    if sizes and (
      list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.max_batch_size
    ):
      raise ValueError(
        f"allowed_batch_sizes {list(sizes)} must be increasing, positive, and end with "
        f"max_batch_size ({self.max_batch_size})"
      )

  @property
  def batch_sizes(self) -> tuple[int, ...]:
    """The batch sizes the model runs at: `allowed_batch_sizes`, or else the powers of two below
    max_batch_size and max_batch_size itself. TF Serving runs any size when the list is empty,
    but a jax2tf model compiles once per new batch size (~0.25 s for the digits CNN on CPU), so
    a bounded set, compiled during warmup, keeps compiles out of serving."""
    if self.allowed_batch_sizes:
      return self.allowed_batch_sizes
    powers = [2**i for i in range(self.max_batch_size.bit_length()) if 2**i < self.max_batch_size]
    return (*powers, self.max_batch_size)

  def padded_size(self, rows: int) -> int:
    return next(size for size in self.batch_sizes if size >= rows)


def _batching_parameters_message():
  """TF Serving's BatchingParameters message (session_bundle_config.proto, not shipped in
  tensorflow-serving-api), built in a private pool so the text format parses as TF Serving's."""
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

  pool = descriptor_pool.DescriptorPool()
  pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
  file = descriptor_pb2.FileDescriptorProto(
    name="tensorflow_serving/batching_parameters.proto",
    package="tensorflow.serving",
    dependency=["google/protobuf/wrappers.proto"],
    syntax="proto3",
  )
  message = file.message_type.add(name="BatchingParameters")
  field = descriptor_pb2.FieldDescriptorProto
  wrapped = [
    ("max_batch_size", ".google.protobuf.Int64Value"),
    ("batch_timeout_micros", ".google.protobuf.Int64Value"),
    ("max_enqueued_batches", ".google.protobuf.Int64Value"),
    ("num_batch_threads", ".google.protobuf.Int64Value"),
    ("thread_pool_name", ".google.protobuf.StringValue"),
  ]
  for number, (name, type_name) in enumerate(wrapped, start=1):
    message.field.add(
      name=name, number=number, type=field.TYPE_MESSAGE, type_name=type_name, label=1
    )
  message.field.add(
    name="allowed_batch_sizes", number=6, type=field.TYPE_INT64, label=field.LABEL_REPEATED
  )
  message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL, label=1)
  pool.Add(file)
  return message_factory.GetMessageClass(
    pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
  )


def read_batching_parameters(path: str | None) -> BatchingOptions:
  """TF Serving's text-format BatchingParameters file (None: the defaults). Raises ValueError
  naming the file and what is wrong."""
  if path is None:
    return BatchingOptions()
  from google.protobuf import text_format

  where = f"--batching_parameters_file={path}"
  try:
    with open(path) as f:
      proto = text_format.Parse(f.read(), _batching_parameters_message()())
  except OSError as e:
    raise ValueError(f"cannot read {where}: {e.strerror}") from e
  except text_format.ParseError as e:
    raise ValueError(f"{where} is not a text BatchingParameters: {e}") from e
  if proto.pad_variable_length_inputs:
    logging.warning(
      "%s: pad_variable_length_inputs is ignored: requests whose shapes differ are batched "
      "separately, so answers never depend on padding",
      where,
    )
  values = {
    name: getattr(proto, name).value
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches")
    if proto.HasField(name)
  }
  if proto.HasField("num_batch_threads"):
    values["num_batch_threads"] = proto.num_batch_threads.value
  try:
    return BatchingOptions(**values, allowed_batch_sizes=tuple(proto.allowed_batch_sizes))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


class _Task:
  __slots__ = ("deadline", "done", "error", "inputs", "outputs", "rows")

  def __init__(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None):
    self.inputs = inputs
    self.rows = rows
    self.deadline = deadline
    self.done = threading.Event()
    self.outputs: dict[str, np.ndarray] | None = None
    self.error: ServingError | None = None


class _Batch:
  def __init__(self, opened: float):
    self.tasks: list[_Task] = []
    self.rows = 0
    self.opened = opened
    # No more tasks join a closed batch.
    self.closed = False


@dataclasses.dataclass
class _Queue:
  model: str
  version: int
  execute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
  batches: collections.deque = dataclasses.field(default_factory=collections.deque)


# Called after every batch with the model, version, rows of requests and rows run (padded).
BatchObserver = Callable[[str, int, int, int], None]


class BatchScheduler:
  """Merges concurrent `run` calls into batches; see the module docstring. Thread-safe."""

  def __init__(self, options: BatchingOptions, observe: BatchObserver | None = None):
    self.options = options
    self._observe = observe
    self._cond = threading.Condition()
    self._queues: dict[tuple, _Queue] = {}
    self._stopping = False
    self._threads = [
      threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
      for i in range(options.num_batch_threads)
    ]
    for thread in self._threads:
      thread.start()

  def run(
    self,
    servable,
    signature_name: str,
    inputs: dict[str, np.ndarray],
    execute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    deadline: float | None = None,
  ) -> dict[str, np.ndarray]:
    """`execute(inputs)`, batched with other requests to the same servable and signature whose
    inputs agree but for their first dimension. `servable` has `model_name` and `version`.
    Raises ServingError: INVALID_ARGUMENT for a request larger than max_batch_size or whose
    inputs disagree on the batch size, UNAVAILABLE when the queue is full or the server stops,
    DEADLINE_EXCEEDED when `deadline` (time.monotonic()) passed before its batch ran (its rows
    are left out of the batch)."""
    sizes = {name: value.shape[0] for name, value in inputs.items()}
    if len(set(sizes.values())) != 1:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"with batching, every input needs the same batch size (first dimension); got {sizes}",
      )
    rows = next(iter(sizes.values()))
    check_deadline(deadline, "the request was queued for a batch")
    if rows == 0:  # Nothing to merge (and no row to pad with).
      return execute(inputs)
    if rows > self.options.max_batch_size:
      raise ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Task size {rows} is larger than maximum input batch size "
        f"{self.options.max_batch_size}; split the request or raise max_batch_size in the "
        "--batching_parameters_file",
      )
    shapes = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))
    key = (id(servable), signature_name, shapes)
    task = _Task(inputs, rows, deadline)
    with self._cond:
      if self._stopping:
        raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
      queue = self._queues.get(key)
      if queue is None:
        queue = self._queues[key] = _Queue(servable.model_name, servable.version, execute)
      batch = queue.batches[-1] if queue.batches and not queue.batches[-1].closed else None
      if batch is None or batch.rows + rows > self.options.max_batch_size:
        if batch is not None:
          batch.closed = True
        if len(queue.batches) >= self.options.max_enqueued_batches:
          raise ServingError(
            grpc.StatusCode.UNAVAILABLE,
            "The batch scheduling queue to which this task was submitted is full "
            f"({self.options.max_enqueued_batches} batches of up to "
            f"{self.options.max_batch_size} rows waiting); retry later",
          )
        batch = _Batch(time.monotonic())
        queue.batches.append(batch)
      batch.tasks.append(task)
      batch.rows += rows
      if batch.rows == self.options.max_batch_size:
        batch.closed = True
      self._cond.notify()
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not task.done.wait(remaining):  # Answered at its deadline; its batch leaves it out.
      raise deadline_exceeded("its batch ran")
    if task.error is not None:
      raise task.error
    return task.outputs

  def queued_tasks(self) -> int:
    """Requests waiting in a queue (not yet taken by a batch thread)."""
    with self._cond:
      return sum(len(b.tasks) for q in self._queues.values() for b in q.batches)

  def stop(self) -> None:
    """Runs what is queued, then ends the threads; later `run` calls get UNAVAILABLE."""
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    for thread in self._threads:
      thread.join()

  def _work(self) -> None:
    timeout = self.options.batch_timeout_micros / 1e6
    while True:
      with self._cond:
        while True:
          now = time.monotonic()
          ready, wait = None, None
          for key, queue in self._queues.items():
            head = queue.batches[0]
            due = head.opened + timeout
            if (head.closed or due <= now or self._stopping) and (
              ready is None or head.opened < ready[2].opened
            ):
              ready = (key, queue, head)
            elif not head.closed:
              wait = due - now if wait is None else min(wait, due - now)
          if ready is not None:
            break
          if self._stopping:
            return
          self._cond.wait(wait)
        key, queue, batch = ready
        batch.closed = True
        queue.batches.popleft()
        if not queue.batches:
          del self._queues[key]
      self._process(queue, batch)

  def _process(self, queue: _Queue, batch: _Batch) -> None:
    tasks = _live_tasks(batch.tasks)
    if not tasks:
      return
    rows = sum(task.rows for task in tasks)
    padded = self.options.padded_size(rows)
    try:
      if len(tasks) == 1 and padded == rows:
        inputs = tasks[0].inputs
      else:
        inputs = {
          name: _concatenate([t.inputs[name] for t in tasks], padded) for name in tasks[0].inputs
        }
      outputs = queue.execute(inputs)
      wrong = {k: list(v.shape) for k, v in outputs.items() if v.ndim == 0 or len(v) != padded}
      if wrong:
        raise ServingError(
          grpc.StatusCode.INTERNAL,
          f"a batch of {padded} rows gave outputs {wrong} that do not lead with the batch; "
          "serve this model without --enable_batching",
        )
      start = 0
      for task in tasks:
        task.outputs = {k: v[start : start + task.rows] for k, v in outputs.items()}
        start += task.rows
    except Exception as e:  # Every request of the batch gets the error, none is left waiting.
      if not isinstance(e, ServingError):
        logging.exception("A batch of %s version %d failed", queue.model, queue.version)
      code = e.code if isinstance(e, ServingError) else grpc.StatusCode.INTERNAL
      message = e.message if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"
      for task in tasks:
        task.error = ServingError(code, message)
    finally:
      for task in tasks:
        task.done.set()
    if self._observe is not None:
      self._observe(queue.model, queue.version, rows, padded)


def _live_tasks(tasks: list[_Task]) -> list[_Task]:
  """The tasks whose deadline has not passed; the others are answered DEADLINE_EXCEEDED now
  (their clients have given up: running their rows would only delay the rest)."""
  now = time.monotonic()
  live = []
  for task in tasks:
    if task.deadline is not None and task.deadline <= now:
      task.error = deadline_exceeded("its batch ran")
      task.done.set()
    else:
      live.append(task)
  return live


def _concatenate(parts: list[np.ndarray], rows: int) -> np.ndarray:
  merged = np.concatenate(parts) if len(parts) > 1 else parts[0]
  if rows > len(merged):  # Pad with copies of the first row: always a valid input.
    merged = np.concatenate([merged, np.repeat(merged[:1], rows - len(merged), axis=0)])
  return merged
