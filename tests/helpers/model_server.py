"""The model server (`python -m serving.server`) in a subprocess on 127.0.0.1, with clients for
its gRPC and REST APIs; the digits model the serving tests serve (trained and exported once per
session) and the rows they send. Used by tests and bench/."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One CPU device and quiet TensorFlow start-up logs, whatever the test process set.
SERVER_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_FLAGS": ""}


# What the tests' servers run with: quick polls and load retries, a small request size limit.
POLL_SECONDS = 0.5
MAX_REQUEST_BYTES = 1 << 20
LOAD_RETRY_SECONDS = 1.0
QUICK_ARGS = [
  f"--file_system_poll_wait_seconds={POLL_SECONDS}",
  f"--max_request_size_bytes={MAX_REQUEST_BYTES}",
  f"--load_retry_interval_micros={int(LOAD_RETRY_SECONDS * 1e6)}",
  "--max_num_load_retries=100",
]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
  """`predicate()`'s first truthy value, polled until `timeout_s`; TimeoutError naming `what`."""
  deadline = time.monotonic() + timeout_s
  while True:
    value = predicate()
    if value:
      return value
    if time.monotonic() > deadline:
      raise TimeoutError(f"{what} within {timeout_s} s")
    time.sleep(interval_s)


def digits_export(tmp_path_factory) -> tuple[str, str]:
  """(workdir, version 1 directory) of a digits smoke run exported once per test session (in
  the session's temporary directory, so every test module shares one). Read-only: copy the
  version directory to serve it from a base path of your own."""
  root = tmp_path_factory.getbasetemp() / "shared-digits"
  workdir, version = root / "run", root / "models" / "digits" / "1"
  if not version.exists():
    from serving.export import exporter
    from tests.helpers.configs import smoke_config
    from trainer import train

    shutil.rmtree(root, ignore_errors=True)  # A run a failed earlier call left half done.
    train.train_and_evaluate(smoke_config({}), str(workdir))
    exporter.export(str(workdir), str(root / "models" / "digits"))
  return str(workdir), str(version)


def copy_version(version_dir: str, base: str, version: int = 1) -> str:
  """Copies an exported version directory to `base/version` (atomically, as export does)."""
  target = os.path.join(base, str(version))
  staging = os.path.join(os.path.dirname(os.path.abspath(base)), f".staging-{os.getpid()}")
  shutil.copytree(version_dir, staging)
  os.makedirs(base, exist_ok=True)
  os.rename(staging, target)
  return target


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def digits_pixels(rows: int = 50) -> np.ndarray:
  """The first `rows` of sklearn's digits as the exported model takes them: raw 0..16 values."""
  from sklearn import datasets

  return datasets.load_digits().data[:rows].astype(np.float32)


def jax_digits_outputs(workdir: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
  """What the trained digits model in `workdir` answers for `pixels`, computed in JAX."""
  import jax

  from serving.export import loading

  model = loading.load(workdir)
  logits = model.model.apply(model.variables, pixels.reshape(-1, 8, 8, 1) / 16.0, train=False)
  return {"probabilities": np.asarray(jax.nn.softmax(logits)), "classes": np.argmax(logits, -1)}


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m module *args` in the repository, run to its exit (start-up errors, CLIs), its
  output captured as text."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=SERVER_ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )


class Server:
  """`python -m serving.server --port=... --rest_api_port=... *args`, on free ports (bound to
  127.0.0.1 by default), its output in `log_path`; `model_name` is the model `wait_ready` waits
  for."""

  def __init__(
    self,
    args: list[str],
    log_path: str,
    *,
    model_name: str = "digits",
    base: str | None = None,
    module: str = "serving.server",
  ):
    """`base`: the model base path the tests drop versions into, if any. `module`: what runs
    (`serving.router` for the router mode, which takes the same --port/--rest_api_port)."""
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    self.model_name = model_name
    self.base = base
    self.grpc_port, self.rest_port = free_port(), free_port()
    self.log_path = log_path
    self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
    self.proc = subprocess.Popen(
      [
        sys.executable,
        "-m",
        module,
        f"--port={self.grpc_port}",
        f"--rest_api_port={self.rest_port}",
        *args,  # No --host: the default, 127.0.0.1, is what the tests reach and check.
      ],
      cwd=REPO,
      env=SERVER_ENV,
      stdout=self.log,
      stderr=subprocess.STDOUT,
    )
    self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
    self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
    self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
    self.url = f"http://127.0.0.1:{self.rest_port}"

  def __enter__(self) -> Server:
    """Waits until the server is ready; it is stopped when the block ends, however it ends."""
    try:
      self.wait_ready()
    except BaseException:
      self.stop()
      raise
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def wait_ready(self, timeout_s: float = 600) -> None:
    """Until the model's status answers over REST (the ports open after the initial load)."""

    def ready() -> bool:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited:\n{self.log_tail()}")
      try:
        return self.get(f"/v1/models/{self.model_name}")[0] == 200
      except OSError:
        return False

    try:
      wait_for(ready, timeout_s, "server ready", interval_s=0.2)
    except TimeoutError as e:
      raise TimeoutError(f"{e}:\n{self.log_tail()}") from None

  def log_tail(self) -> str:
    return self.log_text()[-4000:]

  def log_text(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def get(self, path: str):
    return self.request("GET", path)

  def request(self, method: str, path: str, body: bytes | dict | None = None):
    """(HTTP status, decoded JSON) of a REST request."""
    if isinstance(body, dict):
      body = json.dumps(body).encode()
    request = urllib.request.Request(self.url + path, data=body, method=method)
    try:
      with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  def metrics_text(self, path: str = "/monitoring/prometheus/metrics") -> str:
    with urllib.request.urlopen(self.url + path, timeout=30) as r:
      return r.read().decode()

  def stop(self) -> int:
    """SIGTERM (SIGKILL if it does not exit in 30 s); returns the exit status."""
    self.channel.close()
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(timeout=30)
    self.log.close()
    return self.proc.returncode


def predict_request(inputs: np.ndarray, input_name: str = "inputs", **spec):
  """A PredictRequest for model `name` (default digits) with optional version, version_label,
  signature_name and output_filter."""
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2

  request = predict_pb2.PredictRequest()
  request.model_spec.name = spec.pop("name", "digits")
  if "version" in spec:
    request.model_spec.version.value = spec.pop("version")
  if "version_label" in spec:  # Setting it, even to "", clears `version` (a oneof).
    request.model_spec.version_label = spec.pop("version_label")
  request.model_spec.signature_name = spec.pop("signature_name", "")
  request.output_filter.extend(spec.pop("output_filter", []))
  if spec:
    raise TypeError(f"unknown fields {sorted(spec)}")
  request.inputs[input_name].CopyFrom(tf.make_tensor_proto(inputs))
  return request


def outputs_of(response) -> dict[str, np.ndarray]:
  """A PredictResponse's outputs as arrays."""
  import tensorflow as tf

  return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def check_outputs(outputs, expected, rows=slice(None)) -> None:
  """`outputs` (probabilities, classes) equal the JAX `expected` rows."""
  np.testing.assert_allclose(
    np.asarray(outputs["probabilities"]), expected["probabilities"][rows], rtol=1e-5, atol=1e-7
  )
  np.testing.assert_array_equal(np.asarray(outputs["classes"]), expected["classes"][rows])
