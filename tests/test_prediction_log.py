"""The prediction log format: records written here read back as arrays with their metadata,
TensorFlow reads the same files, a torn tail is skipped, schema breaks and errors are counted,
and feedback joins by request id."""

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving", reason="logs are TF Serving protos (make install)")

from mlops import prediction_log
from mlops.prediction_log import RecordMetadata
from tests.helpers import prediction_logs


def _record(rows, request_id, *, model="digits", version=1, status=0, inputs=None, time_us=0):
  meta = RecordMetadata(
    request_id=request_id,
    time_us=time_us,
    model_name=model,
    version=version,
    version_label="stable",
    arm="b",
    latency_us=1234,
    status_code=status,
  )
  values = {"inputs": rows} if inputs is None else inputs
  batch = len(next(iter(values.values())))
  outputs = {} if status else {"classes": np.arange(batch, dtype=np.int32)}
  return prediction_log.make_record(values, outputs, meta)


@pytest.fixture
def rows():
  return np.arange(6 * 4, dtype=np.float32).reshape(6, 4)


def test_records_read_back_with_their_metadata(tmp_path, rows):
  records = [_record(rows[:1], "a", time_us=10), _record(rows[1:4], "b", time_us=20)]
  records.append(_record(rows[4:], "c", time_us=30))
  prediction_log.write_records(str(tmp_path / "log-0"), records)
  logs = prediction_log.read_logs(str(tmp_path))
  np.testing.assert_array_equal(logs.inputs["inputs"], rows)
  np.testing.assert_array_equal(logs.outputs["classes"], [0, 0, 1, 2, 0, 1])
  assert logs.request_id.tolist() == ["a", "b", "b", "b", "c", "c"]
  assert logs.row_in_request.tolist() == [0, 0, 1, 2, 0, 1]
  assert logs.time_us.tolist() == [10, 20, 20, 20, 30, 30]
  assert set(logs.model_name) == {"digits"} and set(logs.version) == {1}
  assert set(logs.version_label) == {"stable"} and set(logs.arm) == {"b"}
  assert set(logs.latency_us) == {1234}
  assert (logs.num_records, logs.torn_records) == (3, 0)
  assert prediction_log.METADATA_KEY not in logs.outputs


def test_tensorflow_reads_the_same_files(tmp_path, rows):
  import tensorflow as tf
  from tensorflow_serving.apis import prediction_log_pb2

  prediction_log.write_records(str(tmp_path / "log"), [_record(rows[:2], "x")])
  (payload,) = list(tf.data.TFRecordDataset(str(tmp_path / "log")).as_numpy_iterator())
  log = prediction_log_pb2.PredictionLog.FromString(payload)
  assert log.log_metadata.model_spec.name == "digits"
  assert log.predict_log.request.inputs["inputs"].tensor_shape.dim[0].size == 2
  extra = json.loads(log.predict_log.response.outputs[prediction_log.METADATA_KEY].string_val[0])
  assert extra["request_id"] == "x" and extra["format"] == prediction_log.FORMAT_VERSION


@pytest.mark.parametrize("cut", [1, 5, 13, 40])
def test_a_torn_tail_record_is_skipped(tmp_path, rows, cut):
  path = tmp_path / "log"
  prediction_log.write_records(str(path), [_record(rows[i : i + 1], f"r{i}") for i in range(6)])
  data = path.read_bytes()
  path.write_bytes(data[:-cut])  # A writer killed in the middle of the last record.
  logs = prediction_log.read_logs(str(tmp_path))
  assert logs.request_id.tolist() == [f"r{i}" for i in range(5)]
  assert logs.torn_records == 1 and logs.num_records == 5


def test_schema_breaks_errors_and_other_models_are_counted(tmp_path, rows):
  records = [
    _record(rows[:2], "ok"),
    _record(rows[:1, :3], "short"),
    _record(rows[:1].astype(np.float64), "f64"),
    _record(None, "renamed", inputs={"pixels": rows[:1]}),
    _record(rows[:1], "failed", status=3),
    _record(rows[:1], "other", model="mnist"),
  ]
  prediction_log.write_records(str(tmp_path / "log"), records)
  schema = {"inputs": ("float32", (4,))}
  logs = prediction_log.read_logs(str(tmp_path), model_name="digits", input_schema=schema)
  assert logs.request_id.tolist() == ["ok", "ok"]
  assert logs.schema_breaks == {
    "inputs: row shape [3] instead of [4]": 1,
    "inputs: dtype float64 instead of float32": 1,
    "inputs ['pixels'] instead of ['inputs']": 1,
  }
  assert logs.error_records == {3: 1} and logs.other_model_records == 1


def test_feedback_joins_by_request_id_and_counts_unknown_ids(tmp_path, rows):
  prediction_log.write_records(
    str(tmp_path / "log"), [_record(rows[:1], "a"), _record(rows[1:3], "b")]
  )
  logs = prediction_log.read_logs(str(tmp_path))
  csv_path = tmp_path / "feedback.csv"
  csv_path.write_text("request_id,label,row\na,7,\nb,3,1\nzzz,1,\n")
  joined = prediction_log.join_feedback(logs, prediction_log.read_feedback(str(csv_path)))
  assert joined.labels.tolist() == [7, -1, 3]
  assert (joined.num_feedback, joined.matched, joined.unknown_ids) == (3, 2, 1)
  jsonl = tmp_path / "feedback.jsonl"
  jsonl.write_text('{"request_id": "a", "label": 2}\n{"request_id": "q", "label": 2}\n')
  joined = prediction_log.join_feedback(logs, prediction_log.read_feedback(str(jsonl)))
  assert joined.labels.tolist() == [2, -1, -1] and joined.unknown_ids == 1
  jsonl.write_text('{"request_id": "a", "label": "cat"}\n')
  with pytest.raises(prediction_log.LogError, match="entry 1"):
    prediction_log.read_feedback(str(jsonl))


def test_an_empty_directory_is_an_error(tmp_path):
  with pytest.raises(prediction_log.LogError, match="holds no log files"):
    prediction_log.read_logs(str(tmp_path))


def _rpc_record(rpc, inputs, outputs, request_id, status=0):
  meta = RecordMetadata(request_id, 0, "digits", 1, status_code=status, rpc=rpc)
  return prediction_log.make_record(inputs, outputs, meta, signature_name=rpc.lower())


def test_classify_and_regress_records_read_as_features_and_predictions(tmp_path, rows):
  labels = np.array([[b"0", b"1", b"2"]] * 2, object)
  scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)
  records = [
    _record(rows[:1], "predict"),
    _rpc_record(
      "Classify",
      {"inputs": prediction_logs.serialized_examples(rows[:2])},
      {"classes": labels, "scores": scores},
      "c",
    ),
    _rpc_record(
      "Classify",
      {"inputs": prediction_logs.serialized_examples(rows[:2], counter="id")},
      {"scores": scores},
      "c2",
    ),
    _rpc_record(
      "Classify", {"inputs": prediction_logs.serialized_examples(rows[:1])}, {}, "failed", status=3
    ),
    _rpc_record(
      "Regress",
      {"inputs": prediction_logs.serialized_examples(rows[2:5])},
      {"outputs": np.ones(3, np.float32)},
      "r",
    ),
  ]
  prediction_log.write_records(str(tmp_path / "log"), records)
  predict = prediction_log.read_logs(str(tmp_path))  # The default: Predict records only.
  assert predict.request_id.tolist() == ["predict"] and predict.other_rpc_records == 4
  schema = {"inputs": ("float32", (2, 2))}  # The Examples' flat values take the schema's shape.
  classify = prediction_log.read_logs(str(tmp_path), rpc="Classify", input_schema=schema)
  assert classify.request_id.tolist() == ["c", "c"] and classify.other_rpc_records == 2
  np.testing.assert_array_equal(classify.inputs["inputs"], rows[:2].reshape(2, 2, 2))
  np.testing.assert_array_equal(classify.outputs["classes"], [1, 0])  # The top-scoring labels.
  np.testing.assert_array_equal(classify.outputs["scores"], scores)
  assert classify.outputs["class_labels"].tolist() == [["0", "1", "2"]] * 2
  assert classify.schema_breaks == {"inputs ['id', 'inputs'] instead of ['inputs']": 1}
  assert classify.error_records == {3: 1}
  regress = prediction_log.read_logs(str(tmp_path), rpc="Regress")
  np.testing.assert_array_equal(regress.inputs["inputs"], rows[2:5])
  np.testing.assert_array_equal(regress.outputs["outputs"], [1, 1, 1])
  with pytest.raises(prediction_log.LogError, match="'Explain' is not one of"):
    prediction_log.read_logs(str(tmp_path), rpc="Explain")


def test_examples_that_do_not_form_arrays_are_refused_by_name():
  from serving.api_protos import example_pb2

  short, long = example_pb2.Example(), example_pb2.Example()
  short.features.feature["x"].float_list.value.extend([1.0])
  long.features.feature["x"].float_list.value.extend([1.0, 2.0])
  ints = example_pb2.Example()
  ints.features.feature["x"].int64_list.value.append(1)
  for pair, message in (((short, long), "different lengths"), ((short, ints), "kinds")):
    with pytest.raises(ValueError, match=message):
      prediction_log.example_arrays(np.array([e.SerializeToString() for e in pair], object))
