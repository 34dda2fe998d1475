r"""Latency and throughput of the model server (serving.server) on 127.0.0.1.

  .venv/bin/python bench/serving_latency.py [--model_base_path=runs/models/digits] [--seconds=5]

Starts the server in a subprocess on free local ports (with --model_base_path, or else on a digits
smoke model it trains and exports into a temporary directory), then measures, for batches of 1
and 32 digits rows: the SavedModel's `serving_default` called in-process (what the server cannot
go below), gRPC Predict and REST :predict from one client, and gRPC Predict from 8 concurrent
clients (throughput). Client and server share this machine's cores.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_BASE = flags.DEFINE_string("model_base_path", None, "An export base; default: export a smoke run.")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "Seconds each measurement runs.")
_CLIENTS = flags.DEFINE_integer("clients", 8, "Concurrent clients of the throughput measurement.")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _smoke_export(tmp: str) -> str:
  from serving import export
  from tests.helpers.configs import smoke_config
  from trainer import train

  train.train_and_evaluate(smoke_config({}), os.path.join(tmp, "run"))
  return export.export(os.path.join(tmp, "run"), os.path.join(tmp, "models")).path.rsplit("/", 1)[0]


def _measure(fn, seconds: float) -> np.ndarray:
  """Latencies (ms) of `fn()` called back to back for `seconds`, after 5 warmup calls."""
  for _ in range(5):
    fn()
  latencies, deadline = [], time.monotonic() + seconds
  while time.monotonic() < deadline and len(latencies) < 1_000_000:
    start = time.perf_counter()
    fn()
    latencies.append((time.perf_counter() - start) * 1e3)
  return np.array(latencies)


def _row(name: str, latencies: np.ndarray, seconds: float) -> str:
  return (
    f"| {name} | {np.percentile(latencies, 50):.2f} | {np.percentile(latencies, 99):.2f} | "
    f"{len(latencies) / seconds:.0f} |"
  )


def main(argv: list[str]) -> None:
  del argv
  import tensorflow as tf
  from sklearn import datasets
  from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

  tmp = tempfile.mkdtemp(prefix="serving-bench-")
  base = _BASE.value or _smoke_export(tmp)
  latest = max(int(d) for d in os.listdir(base) if d.isdigit())
  grpc_port, rest_port = _free_port(), _free_port()
  log = open(os.path.join(tmp, "server.log"), "w")  # noqa: SIM115 (closed at the end)
  server = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "serving.server",
      f"--port={grpc_port}",
      f"--rest_api_port={rest_port}",
      "--host=127.0.0.1",
      "--model_name=digits",
      f"--model_base_path={base}",
    ],
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"},
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  try:
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=120)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    signature = tf.saved_model.load(os.path.join(base, str(latest))).signatures["serving_default"]
    pixels = datasets.load_digits().data.astype(np.float32)
    seconds = _SECONDS.value
    print("| what | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|")
    for batch in (1, 32):
      x = pixels[:batch]
      request = predict_pb2.PredictRequest()
      request.model_spec.name = "digits"
      request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(x))
      body = json.dumps({"instances": x.tolist()}).encode()

      def rest_call(body=body):
        req = urllib.request.Request(f"http://127.0.0.1:{rest_port}/v1/models/digits:predict", body)
        with urllib.request.urlopen(req, timeout=30) as response:
          response.read()

      def grpc_call(request=request):
        stub.Predict(request, timeout=30)

      print(
        _row(
          f"batch {batch}: in-process TF signature",
          _measure(lambda x=x: signature(inputs=tf.constant(x)), seconds),
          seconds,
        )
      )
      print(_row(f"batch {batch}: gRPC Predict, 1 client", _measure(grpc_call, seconds), seconds))
      print(_row(f"batch {batch}: REST :predict, 1 client", _measure(rest_call, seconds), seconds))
      with concurrent.futures.ThreadPoolExecutor(_CLIENTS.value) as pool:
        parts = list(pool.map(lambda _: _measure(grpc_call, seconds), range(_CLIENTS.value)))
      print(
        _row(
          f"batch {batch}: gRPC Predict, {_CLIENTS.value} clients", np.concatenate(parts), seconds
        )
      )
  finally:
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)
    log.close()
  if code != 0:
    raise SystemExit(f"server exited with {code}; see {log.name}")


if __name__ == "__main__":
  app.run(main)
