r"""What router mode costs (issue #13): `python -m serving.router` in front of the model server
vs the model server alone.

  .venv/bin/python bench/router_mode.py [--model_base_path=runs/models/digits] [--seconds=5]

Starts one model server of the digits model (versions 1 and 2, labels stable=1 and canary=2,
no policy, no log) and two routers in front of it on 127.0.0.1: `router` (forwarding only) and
`router_policy` (a 50/50 sticky split on x-user-id and the prediction log at sampling_rate 1.0).
Then, with one-row requests carrying an x-user-id:

1. Throughput with 32 requests in flight (bench/serving_policy.py's closed loop), rounds
   alternating over direct / router / router_policy: each / direct.
2. p50 latency at concurrency 1: each - direct (the added hop: decode, re-encode, one more
   gRPC round trip, plus the policy's hooks).

Client, routers and server share the machine's cores, so a router's CPU is taken from the
server's: on 2 cores the throughput ratio is a floor, not what a router on its own machine
costs. Every number is noisy on a shared machine (compare ratios within one run).
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serving_latency  # noqa: E402  (its flags: --model_base_path, --seconds, --channels)
import serving_policy  # noqa: E402  (its flags: --rounds, --in_flight)

from tests.helpers import model_server  # noqa: E402

FLAGS = flags.FLAGS


def _servers(tmp: str):
  """(the backend, {name: server}) of direct, router and router_policy (not yet ready)."""
  source = FLAGS.model_base_path or serving_latency._smoke_export(tmp)
  latest = max(int(d) for d in os.listdir(source) if d.isdigit())
  base = os.path.join(tmp, "models", "digits")
  for version in (1, 2):
    model_server.copy_version(os.path.join(source, str(latest)), base, version)
  args = serving_policy._write_configs(tmp, base)
  backend = model_server.Server(args["plain"], os.path.join(tmp, "backend.log"))
  target = f"--backend=127.0.0.1:{backend.grpc_port}"
  # The policy server's model config (labels, log at 100%) and its split.
  policy = [a for a in args["policy"] if a.startswith(("--model_config_file", "--traffic"))]
  routers = {
    "router": [target, "--grpc_max_threads=64"],
    "router_policy": [target, "--grpc_max_threads=64", *policy],
  }
  servers = {"direct": backend}
  for name, extra in routers.items():
    servers[name] = model_server.Server(
      extra, os.path.join(tmp, f"{name}.log"), module="serving.router"
    )
  return backend, servers


def main(argv: list[str]) -> None:
  del argv
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2

  tmp = tempfile.mkdtemp(prefix="router-bench-")
  backend, servers = _servers(tmp)
  try:
    for server in servers.values():
      server.wait_ready(timeout_s=300)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(model_server.digits_pixels(1)))
    stubs = {name: serving_latency._stubs(s, FLAGS.channels) for name, s in servers.items()}
    rates = {name: [] for name in servers}
    errors = 0
    for _ in range(FLAGS.rounds):
      for name in servers:
        rate, failed = serving_latency._throughput(
          stubs[name],
          request,
          FLAGS.in_flight,
          FLAGS.seconds,
          metadata=serving_policy.user_metadata,
        )
        rates[name].append(rate)
        errors += failed
    p50 = {}
    for name, server in servers.items():

      def call(stub=server.predict_stub):
        return stub.Predict(request, timeout=30, metadata=[("x-user-id", "u1")])

      p50[name] = float(np.percentile(serving_latency._latencies(call, FLAGS.seconds), 50)) * 1e3
    serving_policy.report(rates, p50, f"errors: {errors}", column="path", baseline="direct")
  finally:
    for name, server in servers.items():
      if name != "direct":
        server.stop()
    backend.stop()


if __name__ == "__main__":
  app.run(main)
