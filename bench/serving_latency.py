r"""Latency and throughput of the model server (serving.server) on 127.0.0.1, with and without
server-side batching.

  .venv/bin/python bench/serving_latency.py [--model_base_path=runs/models/digits] [--seconds=5]

Starts two servers of the same model in subprocesses on free local ports (with
--model_base_path, or else on a digits smoke model it trains and exports into a temporary
directory): one plain, one with `--batching_parameters_file` (`--max_batch_size`,
`--batch_timeout_micros`, `--num_batch_threads`). Then, with one-row digits requests:

1. Latency at concurrency 1 (p50/p99): the SavedModel's `serving_default` called in-process
   (the floor a server cannot go below), a gRPC Predict round trip to each server, and a REST
   :predict to the plain one. Target: gRPC adds at most 0.5 ms to the in-process p50. Beside
   them the same request's bytes sent to `bench/grpc_echo.py`, a grpcio server that does no
   work: what grpcio alone costs here, and each server's CPU per call (from /proc).
2. Throughput at concurrency 1, 8 and 32 against each server: a closed loop that keeps N
   requests in flight (gRPC futures, so the client needs no thread per request) over
   `--channels` connections for `--seconds`. Target: batching at least 3x the plain server at
   concurrency 32. `--server_args=--num_workers=2` runs both servers as 2 processes each.
3. The same comparison without the RPC layer: N threads in this process call the loaded
   version's `run` (request validation, the TF call) with and without a BatchScheduler of the
   same parameters: what batching saves where the model call, not gRPC, is the cost.

Client and servers share this machine's cores; servers alternate within each concurrency so
drift in the machine's load hits both alike. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.helpers import model_server  # noqa: E402

_BASE = flags.DEFINE_string("model_base_path", None, "An export base; default: export a smoke run.")
_MODEL = flags.DEFINE_string(
  "model", "cnn", "config.model.name of the digits smoke model trained when no base path is given."
)
_SECONDS = flags.DEFINE_float("seconds", 5.0, "Seconds each measurement runs.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "8", "32"], "Requests kept in flight.")
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 32, "Batching server's max_batch_size.")
_BATCH_TIMEOUT_MICROS = flags.DEFINE_integer(
  "batch_timeout_micros", 0, "Batching server's batch_timeout_micros."
)
_SERVER_ARGS = flags.DEFINE_list(
  "server_args", [], "More flags for both servers, e.g. --grpc_max_threads=64."
)
_CHANNELS = flags.DEFINE_integer(
  "channels", 4, "gRPC connections the throughput client spreads its requests over."
)
_NUM_BATCH_THREADS = flags.DEFINE_integer(
  "num_batch_threads", os.cpu_count() or 1, "Batching server's num_batch_threads."
)


ECHO_ROW = "gRPC echo, no work (grpcio's floor)"


def _smoke_export(tmp: str) -> str:
  from serving.export import exporter as export
  from tests.helpers.configs import smoke_config
  from trainer import train

  train.train_and_evaluate(smoke_config({"model.name": _MODEL.value}), os.path.join(tmp, "run"))
  return export.export(os.path.join(tmp, "run"), os.path.join(tmp, "models")).path.rsplit("/", 1)[0]


def _latencies(fn, seconds: float) -> np.ndarray:
  """Latencies (ms) of `fn()` called back to back for `seconds`, after 20 warmup calls."""
  for _ in range(20):
    fn()
  latencies, deadline = [], time.monotonic() + seconds
  while time.monotonic() < deadline and len(latencies) < 1_000_000:
    start = time.perf_counter()
    fn()
    latencies.append((time.perf_counter() - start) * 1e3)
  return np.array(latencies)


def _cpu_ms_per_call(fn, seconds: float, pid: int) -> tuple[np.ndarray, float]:
  """`_latencies(fn, seconds)` and process `pid`'s CPU ms per call meanwhile."""
  from bench.grpc_echo import process_cpu_seconds

  before = process_cpu_seconds(pid)
  latencies = _latencies(fn, seconds)
  return latencies, (process_cpu_seconds(pid) - before) * 1e3 / (len(latencies) + 20)


class _Echo:
  """bench/grpc_echo.py in a subprocess, and a stub-like `.Predict` of its echo method."""

  def __init__(self):
    import subprocess

    import grpc

    from bench import grpc_echo

    self.proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "bench", "grpc_echo.py")],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    port = int(self.proc.stdout.readline())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    self.Predict = channel.unary_unary(grpc_echo.METHOD)  # Named as a stub's method.

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=30)


def _stubs(server, channels: int) -> list:
  """PredictionService stubs over `channels` separate TCP connections (a subchannel pool of
  their own each), so a server's --num_workers processes all get connections."""
  import grpc
  from tensorflow_serving.apis import prediction_service_pb2_grpc

  return [
    prediction_service_pb2_grpc.PredictionServiceStub(
      grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
      )
    )
    for _ in range(channels)
  ]


def _throughput(
  stubs: list, request, concurrency: int, seconds: float, metadata=None
) -> tuple[float, int]:
  """Requests/s of a closed loop keeping `concurrency` Predicts in flight (spread over the
  stubs' connections); and the errors. `metadata(slot)`, when given, is the gRPC metadata of
  every request of loop slot `slot` (e.g. its own x-user-id)."""
  lock = threading.Lock()
  done = threading.Event()
  counts = {"ok": 0, "errors": 0, "in_flight": concurrency}
  deadline = time.monotonic() + seconds

  def send(slot: int):
    stub = stubs[slot % len(stubs)]
    extra = {"metadata": metadata(slot)} if metadata else {}
    future = stub.Predict.future(request, timeout=30, **extra)
    future.add_done_callback(lambda f: on_done(f, slot))

  def on_done(future, slot):
    with lock:
      counts["ok" if future.exception() is None else "errors"] += 1
      if time.monotonic() >= deadline:
        counts["in_flight"] -= 1
        if counts["in_flight"] == 0:
          done.set()
        return
    send(slot)

  start = time.perf_counter()
  for slot in range(concurrency):
    send(slot)
  done.wait(seconds + 60)
  return counts["ok"] / (time.perf_counter() - start), counts["errors"]


def main(argv: list[str]) -> None:
  del argv
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2

  tmp = tempfile.mkdtemp(prefix="serving-bench-")
  base = _BASE.value or _smoke_export(tmp)
  latest = max(int(d) for d in os.listdir(base) if d.isdigit())
  from serving.server import batching

  batching_options = batching.BatchingOptions(
    max_batch_size=_MAX_BATCH_SIZE.value,
    batch_timeout_micros=_BATCH_TIMEOUT_MICROS.value,
    num_batch_threads=_NUM_BATCH_THREADS.value,
    max_enqueued_batches=1000,
  )
  batching_file = os.path.join(tmp, "batching.config")
  with open(batching_file, "w") as f:
    f.write(
      f"max_batch_size {{ value: {_MAX_BATCH_SIZE.value} }}\n"
      f"batch_timeout_micros {{ value: {_BATCH_TIMEOUT_MICROS.value} }}\n"
      f"num_batch_threads {{ value: {_NUM_BATCH_THREADS.value} }}\n"
      "max_enqueued_batches { value: 1000 }\n"
    )
  args = ["--model_name=digits", f"--model_base_path={base}", *_SERVER_ARGS.value]
  servers = {
    "plain": model_server.Server(args, os.path.join(tmp, "plain.log")),
    "batching": model_server.Server(
      [*args, f"--batching_parameters_file={batching_file}"], os.path.join(tmp, "batching.log")
    ),
  }
  echo = _Echo()
  echo_stubs = [echo]
  try:
    for server in servers.values():
      server.wait_ready(timeout_s=300)
    stubs = {name: server.predict_stub for name, server in servers.items()}
    channel_stubs = {name: _stubs(server, _CHANNELS.value) for name, server in servers.items()}
    signature = tf.saved_model.load(os.path.join(base, str(latest))).signatures["serving_default"]
    x = model_server.digits_pixels(1)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(x))
    body = json.dumps({"instances": x.tolist()}).encode()
    rest_url = servers["plain"].url + "/v1/models/digits:predict"

    def rest_call():
      with urllib.request.urlopen(urllib.request.Request(rest_url, body), timeout=30) as r:
        r.read()

    seconds = _SECONDS.value
    serialized = request.SerializeToString()
    calls = {  # name: (call, the pid or server whose CPU it costs; None: the echo server)
      "in-process TF signature": (lambda: signature(inputs=tf.constant(x)), os.getpid()),
      ECHO_ROW: (lambda: echo.Predict(serialized, timeout=30), None),
      "gRPC Predict": (lambda: stubs["plain"].Predict(request, timeout=30), servers["plain"]),
      "gRPC Predict, batching server": (
        lambda: stubs["batching"].Predict(request, timeout=30),
        servers["batching"],
      ),
      "REST :predict": (rest_call, servers["plain"]),
    }
    results = {}
    for name, (call, owner) in calls.items():
      pid = owner if isinstance(owner, int) else (owner or echo).proc.pid
      results[name] = _cpu_ms_per_call(call, seconds, pid)
    print("\nLatency, one-row requests, concurrency 1 (CPU: the serving process's, per call):\n")
    print("| call | p50 ms | p99 ms | CPU ms per call |")
    print("|---|---|---|---|")
    for name, (latencies, cpu_ms) in results.items():
      p50, p99 = np.percentile(latencies, 50), np.percentile(latencies, 99)
      print(f"| {name} | {p50:.2f} | {p99:.2f} | {cpu_ms:.2f} |")
    p50 = {name: float(np.percentile(latencies, 50)) for name, (latencies, _) in results.items()}
    overhead = p50["gRPC Predict"] - p50["in-process TF signature"]
    print(f"\ngRPC overhead over in-process at p50: {overhead:.2f} ms (target <= 0.5 ms)")
    print(f"grpcio's own round trip (echo, no work) at p50: {p50[ECHO_ROW]:.2f} ms")

    print("\nThroughput, one-row requests (requests/s; echo: the same bytes, no work):\n")
    print("| in flight | echo | plain | batching | batching / plain | errors |")
    print("|---|---|---|---|---|---|")
    for concurrency in map(int, _CONCURRENCY.value):
      rates, errors = {}, 0
      for name in ("echo", "plain", "batching"):
        pool, sent = (echo_stubs, serialized) if name == "echo" else (channel_stubs[name], request)
        _throughput(pool, sent, concurrency, min(1.0, seconds))  # Warm up.
        rates[name], failed = _throughput(pool, sent, concurrency, seconds)
        errors += failed
      print(
        f"| {concurrency} | {rates['echo']:.0f} | {rates['plain']:.0f} | "
        f"{rates['batching']:.0f} | {rates['batching'] / rates['plain']:.2f}x | {errors} |"
      )
  finally:
    echo.close()
    codes = {name: server.stop() for name, server in servers.items()}  # Stop all, then judge.
    for name, code in codes.items():
      if code != 0:
        raise SystemExit(f"the {name} server failed; see {servers[name].log_path}")
  _in_process(base, latest, x, batching_options)


def _in_process(base: str, version: int, x: np.ndarray, options) -> None:
  from serving import contract
  from serving.server import batching, loaded_version

  print("\nIn process, no RPC: threads calling the loaded version (requests/s):\n")
  print("| threads | plain | batching | batching / plain |")
  print("|---|---|---|---|")
  scheduler = batching.BatchScheduler(options)
  versions = {
    name: loaded_version.LoadedVersion("digits", version, contract.version_dir(base, version), s)
    for name, s in (("plain", None), ("batching", scheduler))
  }
  for loaded in versions.values():
    loaded.warm_up()
  try:
    for threads in map(int, _CONCURRENCY.value):
      rates = {name: _threads_rate(v, x, threads, _SECONDS.value) for name, v in versions.items()}
      print(
        f"| {threads} | {rates['plain']:.0f} | {rates['batching']:.0f} | "
        f"{rates['batching'] / rates['plain']:.2f}x |"
      )
  finally:
    scheduler.stop()


def _threads_rate(loaded, x: np.ndarray, threads: int, seconds: float) -> float:
  counts = [0] * threads
  deadline = time.monotonic() + seconds

  def loop(i):
    while time.monotonic() < deadline:
      loaded.run("", {"inputs": x})
      counts[i] += 1

  workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
  start = time.perf_counter()
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join()
  return sum(counts) / (time.perf_counter() - start)


if __name__ == "__main__":
  app.run(main)
