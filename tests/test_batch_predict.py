"""Batch inference on Ray: the same rows through batch_predict and through the model server give
identical outputs (batch/online parity); npz, ArrayRecord and Parquet inputs agree; every row
records the model and version; the PredictionLog output reads back; bad input is one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="batch inference runs SavedModels (make install)")
ray = pytest.importorskip("ray", reason="batch inference runs on Ray Data (make install)")

from mlops import prediction_log  # noqa: E402
from serving.batch_predict import main as batch_predict  # noqa: E402
from tests.helpers import digits_export, model_server  # noqa: E402

ROWS = 600  # two full batches of 256 and a padded one of 88 rows (-> 128)
BATCH = 256


@pytest.fixture(scope="session")
def local_ray():
  """One embedded Ray for the session (its start costs seconds): 2 actors + 1 for writes."""
  started = batch_predict.init_ray(None, num_cpus=3, num_actors=2)
  yield
  if started:
    ray.shutdown()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  return digits_export.digits_export(tmp_path_factory)


@pytest.fixture(scope="module")
def pixels():
  return model_server.digits_pixels(ROWS)


def _predict(saved_model, input_path, output, **kwargs):
  result = batch_predict.run(
    saved_model, str(input_path), str(output), model_name="digits", model_version=1, **kwargs
  )
  return result, batch_predict.read_output(str(output))


def _column(table, name, width=None):
  values = table.column(name).combine_chunks()
  if width is None:
    return values.to_numpy()
  return values.flatten().to_numpy().reshape(-1, width)


def test_batch_outputs_equal_the_model_servers(saved_model, pixels, local_ray, tmp_path):
  np.savez(tmp_path / "rows.npz", inputs=pixels)
  result, table = _predict(saved_model, tmp_path / "rows.npz", tmp_path / "out", batch_size=BATCH)
  assert result.rows == ROWS and table.num_rows == ROWS
  assert _column(table, "row").tolist() == list(range(ROWS))
  assert set(table.column("model_name").to_pylist()) == {"digits"}
  assert set(table.column("model_version").to_pylist()) == {1}
  batch_probabilities = _column(table, "probabilities", 10)
  batch_classes = _column(table, "classes")
  # Online: the server with batching pads each request to the same allowed batch sizes.
  base = os.path.dirname(saved_model)
  args = ["--model_name=digits", f"--model_base_path={base}", "--enable_batching"]
  with model_server.Server(args, str(tmp_path / "server.log")) as server:
    online = [server_predict(server, pixels[s : s + BATCH]) for s in range(0, ROWS, BATCH)]
  online_probabilities = np.concatenate([o["probabilities"] for o in online])
  online_classes = np.concatenate([o["classes"] for o in online])
  np.testing.assert_array_equal(batch_classes, online_classes)
  np.testing.assert_array_equal(batch_probabilities, online_probabilities)  # bitwise


def server_predict(server, rows):
  from tensorflow_serving.apis import predict_pb2

  from serving.server import tensors

  request = predict_pb2.PredictRequest()
  request.model_spec.name = "digits"
  tensors.fill_tensor_proto(request.inputs["inputs"], rows)
  response = server.predict_stub.Predict(request, timeout=60)
  return {k: tensors.to_ndarray(v) for k, v in response.outputs.items()}


def test_array_record_and_parquet_inputs_agree_and_the_log_reads_back(
  saved_model, pixels, local_ray, tmp_path
):
  import pyarrow as pa
  import pyarrow.parquet as pq

  from serving.batch_predict import predictor
  from trainer.data import sources

  rows = pixels[:300]
  np.savez(tmp_path / "rows.npz", rows)  # the only array, unnamed
  sources.write_array_record(str(tmp_path / "rows.array_record"), rows, np.zeros(len(rows)))
  pq.write_table(pa.table({"inputs": predictor.to_arrow(rows)}), tmp_path / "rows.parquet")
  logs = tmp_path / "logs"
  _, reference = _predict(
    saved_model, tmp_path / "rows.npz", tmp_path / "a", prediction_log_dir=str(logs)
  )
  for name in ("rows.array_record", "rows.parquet"):
    _, table = _predict(saved_model, tmp_path / name, tmp_path / f"out-{name}", num_actors=1)
    assert table.equals(reference), name
  read = prediction_log.read_logs(str(logs), model_name="digits")
  order = np.argsort([int(i.rsplit("-", 1)[1]) for i in read.request_id])
  np.testing.assert_array_equal(read.inputs["inputs"][order], rows)
  np.testing.assert_array_equal(read.outputs["classes"][order], _column(reference, "classes"))
  assert set(read.version) == {1}


def test_bad_input_is_refused_before_writing(saved_model, pixels, local_ray, tmp_path):
  np.savez(tmp_path / "rows.npz", inputs=pixels[:10, :50])
  with pytest.raises(batch_predict.inputs_lib.InputError, match=r"rows of shape \[50\]"):
    _predict(saved_model, tmp_path / "rows.npz", tmp_path / "out")
  with pytest.raises(batch_predict.BatchPredictError, match="batch sizes"):
    _predict(saved_model, tmp_path / "rows.npz", tmp_path / "out", batch_size=100)
  assert not os.path.exists(tmp_path / "out")
  (tmp_path / "taken").mkdir()
  with pytest.raises(batch_predict.BatchPredictError, match="exists"):
    _predict(saved_model, tmp_path / "rows.npz", tmp_path / "taken")


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "serving.batch_predict", *args],
    capture_output=True,
    text=True,
    env=model_server.SERVER_ENV,
    timeout=300,
  )


def test_cli_errors_are_one_line(saved_model, tmp_path):
  port = model_server.free_port()  # nothing listens there
  cases = {
    "does not answer": [f"--ray_address=127.0.0.1:{port}"],
    "not a registered model": ["--model=digits@production"],
  }
  for expected, extra in cases.items():
    args = [f"--input={tmp_path}/x.npz", f"--output={tmp_path}/out"]
    if not extra[0].startswith("--model="):
      args.append(f"--saved_model={saved_model}")
    done = _cli(*args, *extra)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1
