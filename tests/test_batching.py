"""The batch scheduler on its own (no TensorFlow): merging, splitting, padding, a full queue,
errors, shutdown, and TF Serving's batching parameters file."""

import threading
import time

import grpc
import numpy as np
import pytest

from serving.server import batching
from serving.server.errors import ServingError
from tests.helpers.model_server import wait_for


class Servable:
  """Stands in for a loaded model version: doubles `x`, records every batch it runs."""

  model_name = "m"
  version = 1

  def __init__(self, gate: threading.Event | None = None):
    self.batches = []
    self.gate = gate
    self.entered = threading.Event()  # Set when a batch starts running.

  def execute(self, inputs):
    self.entered.set()
    if self.gate is not None:
      assert self.gate.wait(30), "the test never opened the gate"
    self.batches.append({k: v.copy() for k, v in inputs.items()})
    return {"y": inputs["x"] * 2, "n": np.full(len(inputs["x"]), len(inputs["x"]))}


def _run_concurrently(scheduler, servable, requests):
  results = [None] * len(requests)
  errors = [None] * len(requests)

  def call(i):
    try:
      results[i] = scheduler.run(servable, "serving_default", requests[i], servable.execute)
    except ServingError as e:
      errors[i] = e

  threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(30)
  return results, errors


@pytest.fixture
def make_scheduler():
  schedulers = []

  def make(observe=None, **options):
    scheduler = batching.BatchScheduler(batching.BatchingOptions(**options), observe)
    schedulers.append(scheduler)
    return scheduler

  yield make
  for scheduler in schedulers:
    scheduler.stop()


def test_concurrent_requests_are_merged_and_each_gets_its_own_rows(make_scheduler):
  observed = []
  scheduler = make_scheduler(
    lambda *args: observed.append(args),
    max_batch_size=12,
    batch_timeout_micros=5_000_000,  # Only a full batch runs, whatever the thread timing.
    num_batch_threads=1,
  )
  servable = Servable()
  requests = [{"x": np.arange(3, dtype=np.float32) + 10 * i} for i in range(4)]
  results, errors = _run_concurrently(scheduler, servable, requests)
  assert errors == [None] * 4
  assert len(servable.batches) == 1 and len(servable.batches[0]["x"]) == 12
  for request, result in zip(requests, results, strict=True):
    np.testing.assert_array_equal(result["y"], request["x"] * 2)
    np.testing.assert_array_equal(result["n"], [12, 12, 12])
  assert observed == [("m", 1, 12, 12)]


def test_a_batch_runs_when_its_timeout_expires(make_scheduler):
  scheduler = make_scheduler(max_batch_size=100, batch_timeout_micros=20_000, num_batch_threads=1)
  servable = Servable()
  start = time.monotonic()
  result = scheduler.run(servable, "s", {"x": np.ones(2, np.float32)}, servable.execute)
  assert time.monotonic() - start >= 0.02
  np.testing.assert_array_equal(result["y"], [2, 2])


def test_batches_are_padded_to_an_allowed_size_and_the_padding_is_dropped(make_scheduler):
  observed = []
  scheduler = make_scheduler(
    lambda *args: observed.append(args), max_batch_size=8, allowed_batch_sizes=(4, 8)
  )
  servable = Servable()
  result = scheduler.run(servable, "s", {"x": np.array([1.0, 2.0, 3.0])}, servable.execute)
  np.testing.assert_array_equal(servable.batches[0]["x"], [1, 2, 3, 1])  # First row repeated.
  np.testing.assert_array_equal(result["y"], [2, 4, 6])
  assert observed == [("m", 1, 3, 4)]


def test_requests_whose_shapes_differ_are_not_merged(make_scheduler):
  scheduler = make_scheduler(max_batch_size=4, batch_timeout_micros=200_000, num_batch_threads=2)
  servable = Servable()
  requests = [{"x": np.zeros((2, 3), np.float32)}, {"x": np.zeros((2, 5), np.float32)}]
  results, errors = _run_concurrently(scheduler, servable, requests)
  assert errors == [None, None]
  assert sorted(b["x"].shape for b in servable.batches) == [(2, 3), (2, 5)]
  assert [r["y"].shape for r in results] == [(2, 3), (2, 5)]


def test_a_full_queue_answers_unavailable(make_scheduler):
  gate = threading.Event()
  scheduler = make_scheduler(max_batch_size=1, max_enqueued_batches=1, num_batch_threads=1)
  servable = Servable(gate)
  outcome = {}

  def call(name):
    try:
      outcome[name] = scheduler.run(servable, "s", {"x": np.ones(1)}, servable.execute)
    except ServingError as e:
      outcome[name] = e

  running = threading.Thread(target=call, args=("running",))
  running.start()
  assert servable.entered.wait(30)  # The first batch runs, holding the only batch thread.
  queued = threading.Thread(target=call, args=("queued",))
  queued.start()
  wait_for(lambda: scheduler.queued_tasks() == 1, 30, "the second request queued")
  with pytest.raises(ServingError) as error:
    scheduler.run(servable, "s", {"x": np.ones(1)}, servable.execute)
  assert error.value.code == grpc.StatusCode.UNAVAILABLE
  assert "The batch scheduling queue to which this task was submitted is full" in (
    error.value.message
  )
  gate.set()
  running.join(30)
  queued.join(30)
  assert not running.is_alive() and not queued.is_alive()
  assert all(isinstance(v, dict) for v in outcome.values()), outcome


def test_a_request_past_its_deadline_is_answered_then_and_its_rows_never_run(make_scheduler):
  gate = threading.Event()
  observed = []
  scheduler = make_scheduler(
    lambda *args: observed.append(args), max_batch_size=1, num_batch_threads=1
  )
  servable = Servable(gate)
  outcome = {}

  def call(name, value, deadline=None):
    try:
      outcome[name] = scheduler.run(
        servable, "s", {"x": np.full(1, value)}, servable.execute, deadline
      )
    except ServingError as e:
      outcome[name] = e

  threads = [threading.Thread(target=call, args=("running", 1.0))]
  threads[0].start()
  assert servable.entered.wait(30)  # Holds the only batch thread until the gate opens.
  threads.append(threading.Thread(target=call, args=("expiring", 2.0, time.monotonic() + 0.2)))
  threads[-1].start()
  wait_for(lambda: scheduler.queued_tasks() == 1, 30, "the expiring request queued")
  threads.append(threading.Thread(target=call, args=("patient", 3.0)))
  threads[-1].start()
  threads[1].join(30)  # Answered at its deadline, while its batch still waits.
  assert outcome["expiring"].code == grpc.StatusCode.DEADLINE_EXCEEDED
  assert "deadline passed before its batch ran" in outcome["expiring"].message
  gate.set()
  for thread in threads:
    thread.join(30)
  np.testing.assert_array_equal(outcome["patient"]["y"], [6.0])
  assert [float(batch["x"][0]) for batch in servable.batches] == [1.0, 3.0]
  assert observed == [("m", 1, 1, 1), ("m", 1, 1, 1)]
  with pytest.raises(ServingError, match="before the request was queued") as error:
    scheduler.run(servable, "s", {"x": np.ones(1)}, servable.execute, time.monotonic() - 1)
  assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
  assert scheduler.queued_tasks() == 0


def test_a_request_without_rows_runs_as_it_is(make_scheduler):
  scheduler = make_scheduler(max_batch_size=4, allowed_batch_sizes=(2, 4))
  servable = Servable()
  result = scheduler.run(servable, "s", {"x": np.ones((0, 3))}, servable.execute)
  assert result["y"].shape == (0, 3)


def test_a_request_larger_than_max_batch_size_is_refused(make_scheduler):
  scheduler = make_scheduler(max_batch_size=4)
  servable = Servable()
  with pytest.raises(ServingError, match="Task size 5 is larger than maximum input batch size 4"):
    scheduler.run(servable, "s", {"x": np.ones(5)}, servable.execute)
  with pytest.raises(ServingError, match="same batch size") as error:
    scheduler.run(servable, "s", {"x": np.ones(2), "z": np.ones(3)}, servable.execute)
  assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_failed_batch_fails_its_requests_only(make_scheduler):
  scheduler = make_scheduler(max_batch_size=4)

  def broken(inputs):
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "bad values")

  with pytest.raises(ServingError, match="bad values"):
    scheduler.run(Servable(), "s", {"x": np.ones(2)}, broken)

  def wrong_rows(inputs):
    return {"y": np.ones(1)}

  with pytest.raises(ServingError, match="do not lead with the batch") as error:
    scheduler.run(Servable(), "s", {"x": np.ones(2)}, wrong_rows)
  assert error.value.code == grpc.StatusCode.INTERNAL
  servable = Servable()
  np.testing.assert_array_equal(
    scheduler.run(servable, "s", {"x": np.ones(2)}, servable.execute)["y"], [2, 2]
  )


def test_stop_runs_what_is_queued_then_refuses(make_scheduler):
  scheduler = make_scheduler(max_batch_size=8, batch_timeout_micros=60_000_000)
  servable = Servable()
  results = []
  waiting = threading.Thread(
    target=lambda: results.append(scheduler.run(servable, "s", {"x": np.ones(2)}, servable.execute))
  )
  waiting.start()
  wait_for(lambda: scheduler.queued_tasks() == 1, 30, "the request queued")
  scheduler.stop()  # Does not wait out the minute-long timeout.
  waiting.join(10)
  np.testing.assert_array_equal(results[0]["y"], [2, 2])
  with pytest.raises(ServingError) as error:
    scheduler.run(servable, "s", {"x": np.ones(2)}, servable.execute)
  assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_batching_parameters_file(tmp_path):
  path = tmp_path / "batching.txt"
  path.write_text(
    "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 1000 }\n"
    "max_enqueued_batches { value: 4 }\nnum_batch_threads { value: 3 }\n"
    "allowed_batch_sizes: 8\nallowed_batch_sizes: 32\n"
  )
  assert batching.read_batching_parameters(str(path)) == batching.BatchingOptions(
    max_batch_size=32,
    batch_timeout_micros=1000,
    max_enqueued_batches=4,
    num_batch_threads=3,
    allowed_batch_sizes=(8, 32),
  )
  assert batching.read_batching_parameters(None) == batching.BatchingOptions()


@pytest.mark.parametrize(
  "text, message",
  [
    ("max_batch_size: 32", "is not a text BatchingParameters"),
    ("max_batchsize { value: 32 }", "is not a text BatchingParameters"),
    ("max_batch_size { value: 0 }", "max_batch_size is 0; it must be at least 1"),
    (
      "max_batch_size { value: 16 } allowed_batch_sizes: 8",
      r"allowed_batch_sizes \[8\] must be increasing, positive, and end with max_batch_size \(16\)",
    ),
  ],
)
def test_bad_batching_parameters_files(text, message, tmp_path):
  path = tmp_path / "batching.txt"
  path.write_text(text)
  with pytest.raises(ValueError, match=f"--batching_parameters_file={path}.*{message}"):
    batching.read_batching_parameters(str(path))
  with pytest.raises(ValueError, match="cannot read"):
    batching.read_batching_parameters(str(tmp_path / "missing.txt"))
