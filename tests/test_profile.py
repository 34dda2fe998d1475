"""The reference profile: written by every export, recomputed for an old export by the CLI, and
its statistics equal numpy's on the training data."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="profiles run the SavedModel (make install)")

from mlops import monitor, monitor_windows, profile
from tests.helpers import digits_export, model_server


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  return digits_export.digits_export(tmp_path_factory)


def _training_pixels():
  from configs import digits_cnn
  from trainer.data import load_dataset

  dataset = load_dataset(digits_cnn.get_config("smoke").data)
  return dataset.train.inputs.reshape(len(dataset.train), -1), dataset


def test_export_writes_a_profile_of_the_training_data(saved_model):
  written = profile.read_profile(saved_model)
  assert written["schema_version"] == profile.SCHEMA_VERSION
  assert written["input"] == {"name": "inputs", "dtype": "float32", "row_shape": [64]}
  pixels, dataset = _training_pixels()
  features = written["groups"]["inputs"]
  assert [f["name"] for f in features] == [f"inputs[{i}]" for i in range(64)]
  assert written["source"]["training_rows"] == len(pixels)
  for j in (0, 10, 37):
    f = features[j]
    np.testing.assert_allclose(
      [f["mean"], f["std"], f["min"], f["max"]],
      [pixels[:, j].mean(), pixels[:, j].std(), pixels[:, j].min(), pixels[:, j].max()],
      rtol=1e-6,
    )
    assert f["nan_share"] == 0 and f["inf_share"] == 0
    # Pixels take the 17 values 0..16: the exact value table, counts summing to the rows.
    values, counts = np.unique(pixels[:, j], return_counts=True)
    assert f["values"]["values"] == values.tolist() and f["values"]["counts"] == counts.tolist()
  numeric = [f for f in features if "bins" in f]
  assert numeric and all(2 <= len(f["bins"]["edges"]) <= profile.NUM_BINS + 1 for f in numeric)
  assert all(sum(f["bins"]["counts"]) == len(pixels) for f in numeric)
  # The served classes on the test split: every row counted once, 10 classes at most.
  classes = written["predictions"]["classes"][0]
  assert classes["kind"] == "categorical"
  assert sum(classes["values"]["counts"]) == len(dataset.test)
  assert written["source"]["eval_split"] == "test"
  assert 0.5 < written["model"]["heldout_accuracy"] <= 1.0
  assert set(classes["values"]["values"]) <= set(range(10))


def test_describe_counts_missing_values_and_categories():
  continuous = np.r_[np.linspace(0.5, 40.5, 48), np.nan, np.inf]  # 48 distinct values
  flag = np.arange(50) % 2.0  # two integer values
  first, second = profile.describe(np.stack([continuous, flag], 1), "x")
  assert first["name"] == "x[0]" and first["kind"] == "numeric"
  assert first["nan_share"] == 0.02 and first["inf_share"] == 0.02
  assert first["mean"] == pytest.approx(20.5) and first["max"] == 40.5
  assert first["sample"] == sorted(continuous[:48]) and "values" not in first
  assert len(first["bins"]["edges"]) == profile.NUM_BINS + 1
  assert sum(first["bins"]["counts"]) == 48
  assert second["kind"] == "categorical"  # Evidently's rule: <= 5 integer values
  assert second["values"]["values"] == [0.0, 1.0] and second["values"]["counts"] == [25, 25]


def test_old_export_gets_a_clear_error_and_the_cli_adds_the_profile(saved_model, tmp_path):
  old = tmp_path / "digits" / "1"
  shutil.copytree(saved_model, old)
  os.remove(profile.profile_path(str(old)))
  with pytest.raises(profile.ProfileError, match=r"python -m mlops\.profile --saved_model="):
    monitor.run_monitor(str(old), str(tmp_path), monitor_windows.MonitorOptions(), output_dir="x")
  command = [sys.executable, "-m", "mlops.profile", f"--saved_model={old}"]
  done = subprocess.run(
    command, capture_output=True, text=True, env=model_server.SERVER_ENV, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(profile.profile_path(saved_model)) as f:
    exported = json.load(f)
  assert profile.read_profile(str(old)) == exported  # the same statistics as at export
  again = subprocess.run(command, capture_output=True, text=True, env=model_server.SERVER_ENV)
  assert again.returncode == 1 and "--overwrite" in again.stderr
  assert again.stderr.startswith("error: ") and "Traceback" not in again.stderr
