"""The model server (`python -m serving.server`) in a subprocess on 127.0.0.1, with clients for
its gRPC and REST APIs; and the digits rows the serving tests send. Used by tests and bench/."""

from __future__ import annotations

import json
import os
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


class Server:
  """`python -m serving.server --port=... --rest_api_port=... *args`, on free ports (bound to
  127.0.0.1 by default), its output in `log_path`; `model_name` is the model `wait_ready` waits
  for."""

  def __init__(self, args: list[str], log_path: str, *, model_name: str = "digits"):
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    self.model_name = model_name
    self.grpc_port, self.rest_port = free_port(), free_port()
    self.log_path = log_path
    self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
    self.proc = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "serving.server",
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

  def wait_ready(self, timeout_s: float = 120) -> None:
    """Until the model's status answers over REST (the ports open after the initial load)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited:\n{self.log_tail()}")
      try:
        if self.get(f"/v1/models/{self.model_name}")[0] == 200:
          return
      except OSError:
        pass
      time.sleep(0.2)
    raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log_tail()}")

  def log_tail(self) -> str:
    with open(self.log_path) as f:
      return f.read()[-4000:]

  def get(self, path: str):
    return self.request("GET", path)

  def request(self, method: str, path: str, body: bytes | None = None):
    """(HTTP status, decoded JSON) of a REST request."""
    request = urllib.request.Request(self.url + path, data=body, method=method)
    try:
      with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

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
