"""The gate's served-path checks: this project's model server, started on the candidate and the
baseline in a subprocess (as TFX's InfraValidator starts a real TF Serving), answers the warmup
records and golden requests over gRPC and REST as the JAX function does, and its latency at
each batch size is compared with the baseline's, served by the same server in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from mlops.gate_quality import make_check as _check
from mlops.registry_store import REPO, RegistryError
from serving import contract

SERVER_ENV = {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serve(name: str, export_base: str, versions: list[int], timeout_s: float = 180.0):
  """A model server on 127.0.0.1 serving `versions` of `name`; yields (grpc port, rest port)
  once each is AVAILABLE. Raises RegistryError (with the server's log) when it is not."""

  with tempfile.TemporaryDirectory(prefix="gate-server-") as tmp:
    config = os.path.join(tmp, "models.config")
    with open(config, "w") as f:
      versions_text = " ".join(f"versions: {v}" for v in versions)
      f.write(
        f'model_config_list {{ config {{ name: "{name}" base_path: "{export_base}" '
        f'model_platform: "tensorflow" model_version_policy {{ specific {{ {versions_text} }} }} '
        "} }"
      )
    grpc_port, rest_port = _free_port(), _free_port()
    log_path = os.path.join(tmp, "server.log")
    with open(log_path, "w") as log:
      proc = subprocess.Popen(
        [
          sys.executable,
          "-m",
          "serving.server",
          f"--port={grpc_port}",
          f"--rest_api_port={rest_port}",
          f"--model_config_file={config}",
        ],
        cwd=REPO,
        env={**os.environ, **SERVER_ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    try:
      deadline = time.monotonic() + timeout_s
      for version in versions:
        while _state(grpc_port, name, version) != "AVAILABLE":
          if proc.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as f:
              tail = f.read()[-1500:]
            raise RegistryError(f"the model server did not serve {name} {versions}: {tail}")
          time.sleep(0.25)
      yield grpc_port, rest_port
    finally:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _state(grpc_port: int, name: str, version: int) -> str:
  """The version's state on the server ("" while the server does not answer)."""
  from mlops import registry_serving

  try:
    return registry_serving.version_state(f"127.0.0.1:{grpc_port}", name, version)
  except RegistryError:
    return ""


def _predict_stub(grpc_port: int):
  import grpc
  from tensorflow_serving.apis import prediction_service_pb2_grpc

  channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
  return prediction_service_pb2_grpc.PredictionServiceStub(channel), channel


def _request(name: str, version: int, signature: str, inputs: dict[str, np.ndarray]):
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2

  request = predict_pb2.PredictRequest()
  request.model_spec.name = name
  request.model_spec.version.value = version
  request.model_spec.signature_name = signature
  for key, value in inputs.items():
    request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  return request


def replay_warmup(stub, name: str, version: int, version_dir: str) -> dict:
  """Sends every warmup record of the version's assets.extra to the server."""
  import grpc
  import tensorflow as tf
  from tensorflow_serving.apis import prediction_log_pb2

  path = contract.warmup_path(version_dir)
  sent, errors = 0, []
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    log = prediction_log_pb2.PredictionLog.FromString(record)
    request = log.predict_log.request
    request.model_spec.name = name
    request.model_spec.version.value = version
    try:
      stub.Predict(request, timeout=60)
      sent += 1
    except grpc.RpcError as e:  # The check fails with the server's message.
      errors.append(f"{e.code().name}: {e.details()}")
  return _check(
    "served.warmup_replay",
    sent,
    f"all {sent + len(errors)} answered",
    not errors,
    "; ".join(errors)[:300],
  )


def parity(stub, rest_port, name, version, golden: dict, expected: dict, tolerance) -> list[dict]:
  """The server's answers to the golden inputs over gRPC and REST versus the JAX function's."""
  import tensorflow as tf

  checks = []
  response = stub.Predict(_request(name, version, contract.DEFAULT_SIGNATURE, golden), timeout=60)
  got_grpc = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
  body = json.dumps({"inputs": {k: v.tolist() for k, v in golden.items()}}).encode()
  url = f"http://127.0.0.1:{rest_port}/v1/models/{name}/versions/{version}:predict"
  with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as reply:
    outputs = json.loads(reply.read())["outputs"]
  got_rest = outputs if isinstance(outputs, dict) else {next(iter(expected)): outputs}
  for api, got in (("grpc", got_grpc), ("rest", got_rest)):
    worst = 0.0
    for key, want in expected.items():
      value = np.asarray(got[key], np.float64)
      scale = max(float(np.abs(want).max()), 1e-30)
      worst = max(worst, float(np.abs(value - np.asarray(want, np.float64)).max()) / scale)
    checks.append(
      _check(
        f"served.parity_{api}",
        worst,
        f"<= {tolerance}",
        worst <= tolerance,
        f"{len(next(iter(golden.values())))} golden examples vs JAX",
      )
    )
  return checks


def latencies(stub, name, versions, golden: dict, batch_size: int, requests: int) -> dict:
  """{version: (p50 ms, p99 ms)} of `requests` Predicts of `batch_size` rows per version, the
  versions interleaved so that both see the same machine load."""
  tiled = {k: np.resize(v, (batch_size, *v.shape[1:])) for k, v in golden.items()}
  prepared = {v: _request(name, v, contract.DEFAULT_SIGNATURE, tiled) for v in versions}
  times = {v: [] for v in versions}
  for i in range(requests + 3):
    for version in versions:
      start = time.perf_counter()
      stub.Predict(prepared[version], timeout=60)
      if i >= 3:  # The first requests of a batch size compile.
        times[version].append((time.perf_counter() - start) * 1e3)
  return {v: (float(np.percentile(t, 50)), float(np.percentile(t, 99))) for v, t in times.items()}


def served_checks(gate, name, export_base, candidate, baseline, golden, expected) -> list[dict]:
  """Every served-path check of the candidate (latency ratios only with a baseline)."""
  versions = [candidate] + ([baseline] if baseline is not None else [])
  checks = []
  with serve(name, export_base, versions) as (grpc_port, rest_port):
    stub, channel = _predict_stub(grpc_port)
    try:
      checks.append(replay_warmup(stub, name, candidate, os.path.join(export_base, str(candidate))))
      checks += parity(
        stub, rest_port, name, candidate, golden, expected, gate.served.parity_tolerance
      )
      for batch_size in gate.served.latency_batch_sizes:
        measured = latencies(stub, name, versions, golden, batch_size, gate.served.latency_requests)
        p50, p99 = measured[candidate]
        if baseline is None:
          checks.append(
            _check(
              f"served.latency_bs{batch_size}",
              p99,
              "recorded (no baseline)",
              True,
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
            )
          )
          continue
        for q, index in (("p50", 0), ("p99", 1)):
          ratio = measured[candidate][index] / max(measured[baseline][index], 1e-9)
          limit = gate.served.max_latency_ratio[q]
          checks.append(
            _check(
              f"served.latency_{q}_ratio_bs{batch_size}",
              ratio,
              f"<= {limit}",
              ratio <= limit,
              f"candidate {measured[candidate][index]:.2f} ms, baseline "
              f"{measured[baseline][index]:.2f} ms",
            )
          )
    finally:
      channel.close()
  return checks
