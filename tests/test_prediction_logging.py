"""The server's prediction log (a model config's logging_config) and x-request-id: records in
mlops.prediction_log's format with their metadata, size rotation, drops counted when the writer
falls behind, and a server killed with SIGKILL under load leaving every complete record
readable. One logging server for the module, one more for the SIGKILL test."""

import json
import os
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from mlops import prediction_log  # noqa: E402
from tests.helpers import model_server  # noqa: E402
from tests.helpers.model_server import predict_request  # noqa: E402

MAX_FILE_BYTES = 20_000  # A few dozen digits records: rotation happens within the test.


def _config_file(directory, base: str, prefix: str) -> str:
  path = os.path.join(directory, "models.config")
  with open(path, "w") as f:
    f.write(
      f"model_config_list {{ config {{ name: 'digits' base_path: '{base}'"
      " model_platform: 'tensorflow'"
      " version_labels { key: 'stable' value: 1 }"
      f" logging_config {{ log_collector_config {{ filename_prefix: '{prefix}' }}"
      " sampling_config { sampling_rate: 1.0 } } } }"
    )
  return path


def _logging_server(tmp_path_factory, digits, name: str, extra=()):
  root = tmp_path_factory.mktemp(name)
  base = str(root / "models" / "digits")
  model_server.copy_version(digits[1], base)
  logs = str(root / "logs")
  args = [
    *model_server.QUICK_ARGS,
    f"--model_config_file={_config_file(str(root), base, os.path.join(logs, 'predict'))}",
    f"--prediction_log_max_file_bytes={MAX_FILE_BYTES}",
    *extra,
  ]
  return model_server.Server(args, str(root / "server.log"), base=base), logs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return model_server.digits_export(tmp_path_factory)


@pytest.fixture(scope="module")
def served(digits, tmp_path_factory):
  server, logs = _logging_server(tmp_path_factory, digits, "logging")
  with server:
    yield server, logs


def _wait_logs(logs: str, count: int, until=lambda read: True):
  """The logs once they hold `count` records and `until(logs)` holds (records are written
  asynchronously: a count alone may be reached before the one a test looks for is written)."""

  def enough():
    try:
      read = prediction_log.read_logs(logs)
    except prediction_log.LogError:
      return None
    return read if read.num_records >= count and until(read) else None

  return model_server.wait_for(enough, 30, f"{count} log records")


def test_request_id_round_trip_grpc(served):
  server, _ = served
  request = predict_request(model_server.digits_pixels(2))
  _, call = server.predict_stub.Predict.with_call(
    request, metadata=[("x-request-id", "client-id-1")], timeout=30
  )
  assert dict(call.trailing_metadata())["x-request-id"] == "client-id-1"
  _, call = server.predict_stub.Predict.with_call(request, timeout=30)
  made = dict(call.trailing_metadata())["x-request-id"]
  assert len(made) == 32 and made != "client-id-1"
  # An error answer carries its id too.
  with pytest.raises(grpc.RpcError) as error:
    server.predict_stub.Predict(
      predict_request(model_server.digits_pixels(2), name="nope"),
      metadata=[("x-request-id", "client-id-2")],
      timeout=30,
    )
  assert dict(error.value.trailing_metadata())["x-request-id"] == "client-id-2"


def test_request_id_round_trip_rest(served):
  server, _ = served
  body = b'{"instances": [[%s]]}' % ",".join(["0.0"] * 64).encode()
  request = urllib.request.Request(
    server.url + "/v1/models/digits:predict", body, {"X-Request-Id": "rest-id-1"}
  )
  with urllib.request.urlopen(request, timeout=30) as response:
    assert response.headers["x-request-id"] == "rest-id-1"
  request = urllib.request.Request(server.url + "/v1/models/digits:predict", body)
  with urllib.request.urlopen(request, timeout=30) as response:
    assert len(response.headers["x-request-id"]) == 32


def test_records_carry_requests_responses_and_metadata(served):
  server, logs = served
  pixels = model_server.digits_pixels(40)
  sent = {}
  for i in range(40):
    rows = pixels[i : i + 1 + i % 3]
    ids = [("x-request-id", f"m-{i}")]
    spec = {"version_label": "stable"} if i % 2 else {}
    response = server.predict_stub.Predict(predict_request(rows, **spec), metadata=ids, timeout=30)
    sent[f"m-{i}"] = (rows, model_server.outputs_of(response), spec)
  with pytest.raises(grpc.RpcError):  # An invalid request is logged with its status code.
    server.predict_stub.Predict(
      predict_request(np.zeros((1, 3), np.float32)), metadata=[("x-request-id", "bad")], timeout=30
    )
  invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
  read = _wait_logs(logs, 41, until=lambda read: invalid in read.error_records)
  assert read.error_records.get(invalid) == 1
  for request_id, (rows, outputs, spec) in sent.items():
    mine = read.select(read.request_id == request_id)
    assert len(mine) == len(rows)
    np.testing.assert_array_equal(mine.inputs["inputs"], rows)
    np.testing.assert_allclose(mine.outputs["probabilities"], outputs["probabilities"])
    assert set(mine.version) == {1} and set(mine.model_name) == {"digits"}
    assert set(mine.version_label) == {spec.get("version_label", "")}
    assert set(mine.role) == {"primary"} and set(mine.arm) == {""}
    assert (mine.latency_us > 0).all() and (mine.time_us > 1.7e15).all()
  assert len(prediction_log.log_files(logs)) > 1  # Rotated by size.
  assert 'serving_prediction_log_records_total{model="digits",outcome="written"}' in (
    server.metrics_text()
  )


def test_classify_is_logged_as_its_signatures_run(served):
  from tensorflow_serving.apis import classification_pb2

  from tests.helpers.tf_examples import example, labels_and_scores

  server, logs = served
  pixels = model_server.digits_pixels(3)
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name, request.model_spec.signature_name = "digits", "classify"
  request.input.example_list.examples.extend(example(inputs=row) for row in pixels)
  response = server.predict_stub.Classify(
    request, metadata=[("x-request-id", "classify-1")], timeout=30
  )
  _, scores = labels_and_scores(response.result)

  def logged():
    read = prediction_log.read_logs(logs, rpc="Classify")
    return read if "classify-1" in set(read.request_id) else None

  read = model_server.wait_for(logged, 30, "the Classify record")
  mine = read.select(read.request_id == "classify-1")
  np.testing.assert_array_equal(mine.inputs["inputs"], pixels)
  np.testing.assert_allclose(mine.outputs["scores"], scores, rtol=1e-6)
  np.testing.assert_array_equal(mine.outputs["classes"], scores.argmax(1))
  assert set(mine.version) == {1} and set(mine.role) == {"primary"}
  assert "classify-1" not in set(prediction_log.read_logs(logs).request_id)  # Predict's only.


def test_a_full_queue_drops_and_counts(tmp_path):
  from serving.server import log_format, metrics, model_config, prediction_logger

  server_metrics = metrics.Metrics(["digits"])
  logger = prediction_logger.PredictionLogger(server_metrics, queue_size=2)
  config = model_config.LoggingConfig(str(tmp_path / "predict"), 1.0)
  rows = {"inputs": np.zeros((1, 64), np.float32)}
  accepted = 0
  for i in range(2000):  # Far faster than the writer encodes: the queue fills.
    meta = log_format.RecordMetadata(f"q{i}", 1, model_name="digits", version=1)
    entry = prediction_logger.LogEntry(config, rows, rows, meta, "serving_default", (None, ""))
    accepted += logger.submit(entry)
  logger.close()
  dropped = server_metrics.log_records.labels("digits", "dropped")._value.get()
  written = server_metrics.log_records.labels("digits", "written")._value.get()
  assert dropped > 0 and written == accepted and dropped + written == 2000
  assert prediction_log.read_logs(str(tmp_path)).num_records == accepted


def _post(server, path: str, body: bytes):
  request = urllib.request.Request(server.url + path, body, method="POST")
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_feedback_endpoint_appends_next_to_the_logs(served):
  from mlops import feedback

  server, logs = served
  for i in range(3):
    server.predict_stub.Predict(
      predict_request(model_server.digits_pixels(2)), metadata=[("x-request-id", f"fb-{i}")]
    )
    body = json.dumps({"request_id": f"fb-{i}", "label": i, "row": 1}).encode()
    assert _post(server, "/v1/models/digits/feedback", body) == (
      200,
      {"request_id": f"fb-{i}", "recorded": True},
    )
  bad = [
    ({"request_id": "fb-0"}, 400),  # No label.
    ({"request_id": "fb-0", "label": -1}, 400),
    ({"request_id": "fb-0", "label": True}, 400),
    ({"request_id": "has space", "label": 1}, 400),
    ({"request_id": "fb-0", "label": 1, "extra": 2}, 400),
  ]
  for body, status in bad:
    assert _post(server, "/v1/models/digits/feedback", json.dumps(body).encode())[0] == status
  assert _post(server, "/v1/models/nope/feedback", b'{"request_id": "a", "label": 1}')[0] == 404
  assert _post(server, "/v1/models/digits/versions/1/feedback", b"{}")[0] == 400
  path = os.path.join(logs, "feedback.jsonl")
  labels = feedback.read_feedback(path)
  assert labels == {(f"fb-{i}", 1): i for i in range(3)}

  def logged():
    read = prediction_log.read_logs(logs)
    return read if {"fb-0", "fb-1", "fb-2"} <= set(read.request_id) else None

  read = model_server.wait_for(logged, 30, "the feedback requests logged")
  assert read.torn_records == 0  # The feedback file is not read as a log.
  joined = feedback.join_feedback(read, labels)
  assert joined.matched == 3 and joined.unknown_ids == 0
  for i in range(3):
    rows = (read.request_id == f"fb-{i}") & (read.row_in_request == 1)
    assert joined.labels[rows].tolist() == [i]
  assert (joined.labels >= 0).sum() == 3


def test_feedback_import_cli(tmp_path):
  import subprocess
  import sys

  from mlops import feedback

  logs = tmp_path / "logs"
  logs.mkdir()
  good = tmp_path / "labels.csv"
  good.write_text("request_id,label,row\na,1,0\nb,2,\n")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"request_id": "c", "label": 3}\n{"request_id": "d", "label": "x"}\n')

  def run(*args):
    return subprocess.run(
      [sys.executable, "-m", "mlops.feedback", *args],
      capture_output=True,
      text=True,
      timeout=120,
      env=model_server.SERVER_ENV,
      cwd=model_server.REPO,
    )

  done = run("import", str(good), f"--logs={logs}")
  assert done.returncode == 0, done.stderr
  assert feedback.read_feedback(str(logs / "feedback.jsonl")) == {("a", 0): 1, ("b", 0): 2}
  refused = run("import", str(bad), f"--logs={logs}")
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert (
    refused.stderr.strip().splitlines()[-1].startswith("error: ") and "entry 2" in refused.stderr
  )
  assert feedback.read_feedback(str(logs / "feedback.jsonl")) == {("a", 0): 1, ("b", 0): 2}


def _tf_readable(path: str) -> int:
  """Records TensorFlow's own reader (which checks every CRC) reads before a torn tail."""
  count = 0
  try:
    for _ in tf.data.TFRecordDataset(path):
      count += 1
  except tf.errors.DataLossError:
    pass
  return count


def test_sigkill_under_load_leaves_every_complete_record(served):
  """The module's last test: it kills the module's server."""
  server, logs = served
  before = _wait_logs(logs, 1).num_records
  sent: set[str] = set()
  stop = threading.Event()
  pixels = model_server.digits_pixels(8)

  def load(worker: int):
    for i in range(100_000):
      if stop.is_set():
        return
      request_id = f"k{worker}-{i}"
      sent.add(request_id)
      try:
        server.predict_stub.Predict(
          predict_request(pixels), metadata=[("x-request-id", request_id)], timeout=10
        )
      except grpc.RpcError:
        return  # The server is gone.

  threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
  for thread in threads:
    thread.start()
  try:
    _wait_logs(logs, before + 50)
    time.sleep(0.5)
    server.proc.kill()  # SIGKILL, while requests are still being logged.
    server.proc.wait(timeout=30)
  finally:
    stop.set()
    for thread in threads:
      thread.join(timeout=30)
  read = prediction_log.read_logs(logs)
  files = prediction_log.log_files(logs)
  assert read.num_records == sum(_tf_readable(f) for f in files) >= before + 50
  assert read.torn_records <= len(files)
  under_load = {i for i in read.request_id if i.startswith("k")}
  assert len(under_load) >= 50 and under_load <= sent
  # Every record parsed: the OK ones all have rows, one request id per record.
  ok_records = read.num_records - sum(read.error_records.values()) - read.other_rpc_records
  assert len(set(zip(read.request_id, read.time_us, strict=True))) == ok_records
