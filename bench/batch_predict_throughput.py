r"""batch_predict's throughput against a plain Python loop calling the same SavedModel.

  .venv/bin/python bench/batch_predict_throughput.py [--saved_model=BASE/N] [--rows=1000000]

The rows are sklearn's digits, tiled to --rows. The plain loop loads the SavedModel and calls its
signature on batches of --batch_size rows (the last one padded, as the server pads), collecting the
outputs. batch_predict runs the same rows on a local Ray (started once, before the timings) with
1 and 2 actors, from an npz file to Parquet; its time includes starting the actors, loading the
model in each, and writing the Parquet files. Order alternates (loop, 1 actor, 2 actors, loop...)
over --repeats so drift in the machine's load hits all alike. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

from serving.batch_predict import main as batch_predict  # noqa: E402

_SAVED_MODEL = flags.DEFINE_string("saved_model", None, "An export; default: a smoke model.")
_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Rows to predict.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Rows per model call.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timings of each variant.")


def _export_smoke_model(root: str) -> str:
  from serving.export import exporter
  from tests.helpers.configs import smoke_config
  from trainer import train

  train.train_and_evaluate(smoke_config({}), os.path.join(root, "run"))
  return exporter.export(os.path.join(root, "run"), os.path.join(root, "models", "digits")).path


def plain_loop(saved_model: str, rows: np.ndarray, batch_size: int) -> float:
  """Seconds to load the model and predict every row, one signature call per batch."""
  import tensorflow as tf

  start = time.perf_counter()
  signature = tf.saved_model.load(saved_model).signatures["serving_default"]
  outputs = []
  for begin in range(0, len(rows), batch_size):
    piece = rows[begin : begin + batch_size]
    padded = np.concatenate([piece, np.repeat(piece[:1], batch_size - len(piece), 0)])
    result = signature(inputs=tf.constant(padded))
    outputs.append({k: v.numpy()[: len(piece)] for k, v in result.items()})
  return time.perf_counter() - start


def ray_run(saved_model: str, input_path: str, root: str, actors: int, batch_size: int) -> float:
  output = tempfile.mkdtemp(prefix="out_", dir=root)
  os.rmdir(output)
  start = time.perf_counter()
  batch_predict.run(
    saved_model,
    input_path,
    output,
    model_name="digits",
    model_version=1,
    num_actors=actors,
    batch_size=batch_size,
  )
  seconds = time.perf_counter() - start
  shutil.rmtree(output)
  return seconds


def main(argv: list[str]) -> None:
  del argv
  import logging as std_logging

  std_logging.getLogger("ray").setLevel(std_logging.WARNING)
  load_before = harness.load_average()
  with tempfile.TemporaryDirectory(prefix="batch_bench_") as root:
    saved_model = _SAVED_MODEL.value or _export_smoke_model(root)
    digits = harness_digits()
    rows = np.resize(digits, (_ROWS.value, digits.shape[1])).astype(np.float32)
    input_path = os.path.join(root, "rows.npz")
    np.savez(input_path, inputs=rows)
    batch_predict.init_ray(None, None, num_actors=2, object_store_bytes=2 << 30)
    times = {"plain loop": [], "batch_predict, 1 actor": [], "batch_predict, 2 actors": []}
    for _ in range(_REPEATS.value):
      times["plain loop"].append(plain_loop(saved_model, rows, _BATCH.value))
      for actors in (1, 2):
        seconds = ray_run(saved_model, input_path, root, actors, _BATCH.value)
        times[f"batch_predict, {actors} actor{'s' if actors > 1 else ''}"].append(seconds)
  harness.print_run_header(load_before, devices=False)
  base = statistics.median(times["plain loop"])
  table_rows = []
  for name, values in times.items():
    median = statistics.median(values)
    table_rows.append(
      [name, f"{median:.1f}", f"{_ROWS.value / median:.0f}", f"{base / median:.2f}x"]
    )
  print(harness.table(["variant", "median s", "rows/s", "vs plain loop"], table_rows))


def harness_digits() -> np.ndarray:
  from sklearn import datasets

  return datasets.load_digits().data.astype(np.float32)


if __name__ == "__main__":
  app.run(main)
