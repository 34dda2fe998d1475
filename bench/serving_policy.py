r"""What the traffic policy and the prediction log cost the model server (issue #13).

  .venv/bin/python bench/serving_policy.py [--model_base_path=runs/models/digits] [--seconds=5]

Starts three servers of the digits model (versions 1 and 2, labels stable=1 and canary=2) on
127.0.0.1: `plain` (no policy, no log), `policy` (a 50/50 sticky split on x-user-id and the
prediction log at sampling_rate 1.0) and `shadow` (plain plus a 100% mirror to canary). Then,
with one-row requests carrying an x-user-id:

1. Throughput with 32 requests in flight (bench/serving_latency.py's closed loop), rounds
   alternating over the servers so drift in the machine's load hits all alike: policy / plain
   (goal >= 0.95x) and shadow / plain; and each server process's CPU per request in those
   rounds (log writer and shadow threads included), steadier than throughput on shared cores.
2. p50 latency at concurrency 1: policy - plain (the added cost of routing + logging; goal <=
   50 us) and shadow / plain (goal <= 1.05x when a core is free for the shadow).

3. The hooks' CPU cost without gRPC or a model (a stub version that answers at once): process
   CPU time per `RequestPath.serve` of a one-row Predict, the log writer's encoding included
   (it is drained before the clock stops): plain, split, log at 100%, split + log. This is
   the number that survives a busy machine; `--in_process_only` runs just this.

Client and servers share the machine's cores: on a 2-core machine the shadow's copy competes
with the primary for CPU, and every number is noisy (compare ratios within one run).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serving_latency  # noqa: E402  (its flags: --model_base_path, --seconds, --channels)

from bench.grpc_echo import process_cpu_seconds  # noqa: E402
from tests.helpers import model_server  # noqa: E402

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating throughput rounds per server.")
_IN_FLIGHT = flags.DEFINE_integer("in_flight", 32, "Requests kept in flight for throughput.")
_SERVERS = flags.DEFINE_list(
  "servers",
  ["plain", "policy", "shadow"],
  "Servers to compare (plain first): plain, policy (split + log), shadow, split (split only), "
  "log (log only).",
)
_IN_PROCESS_ONLY = flags.DEFINE_bool("in_process_only", False, "Only measure 3 (no servers).")
_CALLS = flags.DEFINE_integer("calls", 20_000, "RequestPath.serve calls per in-process variant.")
FLAGS = flags.FLAGS


def _write_configs(tmp: str, base: str) -> dict[str, list[str]]:
  """The three servers' flags."""
  labels = "version_labels { key: 'stable' value: 1 } version_labels { key: 'canary' value: 2 }"
  logging_config = (
    f"logging_config {{ log_collector_config {{ filename_prefix: '{tmp}/logs/predict' }} "
    "sampling_config { sampling_rate: 1.0 } }"
  )
  args = {}
  extras = {"plain": "", "policy": logging_config, "shadow": "", "split": "", "log": logging_config}
  for name, extra in extras.items():
    config = os.path.join(tmp, f"{name}.config")
    with open(config, "w") as f:
      f.write(
        f"model_config_list {{ config {{ name: 'digits' base_path: '{base}' "
        f"model_version_policy {{ all {{}} }} {labels} {extra} }} }}"
      )
    args[name] = [f"--model_config_file={config}", "--grpc_max_threads=64"]
  split = {"key": "x-user-id", "arms": [{"label": "stable", "weight": 50}]}
  split["arms"].append({"label": "canary", "weight": 50})
  policies = {
    "policy": {"models": {"digits": {"split": split}}},
    "shadow": {"models": {"digits": {"mirror": {"label": "canary", "percent": 100}}}},
    "split": {"models": {"digits": {"split": split}}},
  }
  for name, policy in policies.items():
    path = os.path.join(tmp, f"{name}.traffic.json")
    with open(path, "w") as f:
      json.dump(policy, f)
    args[name].append(f"--traffic_config_file={path}")
  return args


def user_metadata(slot: int) -> list[tuple[str, str]]:
  """Each closed-loop slot's requests carry their own x-user-id (the split's key)."""
  return [("x-user-id", f"user-{slot}")]


def _hook_costs(tmp: str, calls: int) -> dict[str, float]:
  """CPU microseconds per RequestPath.serve of a one-row Predict on a stub version, by hooks."""
  import types

  from serving.server import handlers, metrics, model_config, prediction_logger, traffic
  from serving.server.loaded_version import SignatureInfo

  signature = SignatureInfo("serving_default", {}, {})
  outputs = {"probabilities": np.full((1, 10), 0.1, np.float32), "classes": np.zeros(1, np.int32)}
  loaded = types.SimpleNamespace(
    model_name="digits",
    version=1,
    signature=lambda name: signature,
    run=lambda name, arrays, output_filter: outputs,
  )
  inputs = {"inputs": model_server.digits_pixels(1)}
  split_text = json.dumps(
    {
      "models": {
        "digits": {
          "split": {"arms": [{"label": "stable", "weight": 50}, {"label": "canary", "weight": 50}]}
        }
      }
    }
  )
  costs = {}
  for name in ("plain", "split", "log", "split + log"):
    logging_config = model_config.LoggingConfig(
      os.path.join(tmp, "inproc", name.replace(" ", "")), 1.0
    )
    config = model_config.ModelConfig(
      "digits",
      tmp,
      version_labels={"stable": 1, "canary": 1},
      logging=logging_config if "log" in name else None,
    )
    models = types.SimpleNamespace(
      configs={"digits": config}, resolve=lambda name, version, label: loaded
    )
    server_metrics = metrics.Metrics(["digits"])
    policy = None
    if "split" in name:
      policy = traffic.TrafficPolicy(models, server_metrics)
      policy.apply(split_text, "bench")
    logger = prediction_logger.PredictionLogger(server_metrics, queue_size=calls + 1)
    path = handlers.RequestPath(
      handlers.RequestHandlers(models), server_metrics, logger=logger, traffic=policy
    )
    spec = handlers.ModelSpec("digits")

    def work(h, spec=spec):
      prediction = h.predict(spec, inputs)
      return handlers.Reply(None, prediction.served)

    for i in range(200):
      path.serve("grpc", "Predict", spec, work, {"x-user-id": f"u{i}"})
    logger.close()  # Drain the warmup's records before the clock starts.
    logger = path.logger = prediction_logger.PredictionLogger(server_metrics, queue_size=calls + 1)
    start = time.process_time()
    for i in range(calls):
      path.serve("grpc", "Predict", spec, work, {"x-user-id": f"u{i}"})
    logger.close(timeout_s=120)
    costs[name] = (time.process_time() - start) / calls * 1e6
  return costs


def main(argv: list[str]) -> None:
  del argv
  tmp = tempfile.mkdtemp(prefix="serving-policy-bench-")
  costs = _hook_costs(tmp, _CALLS.value)
  print(f"\nRequestPath.serve CPU per one-row Predict on a stub version ({_CALLS.value} calls):\n")
  print("| hooks | CPU us / request | added over plain |")
  print("|---|---|---|")
  for name, cost in costs.items():
    print(f"| {name} | {cost:.1f} | {cost - costs['plain']:+.1f} |")
  if _IN_PROCESS_ONLY.value:
    return
  _servers(tmp)


def _servers(tmp: str) -> None:
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2

  source = FLAGS.model_base_path or serving_latency._smoke_export(tmp)
  latest = max(int(d) for d in os.listdir(source) if d.isdigit())
  base = os.path.join(tmp, "models", "digits")
  for version in (1, 2):
    model_server.copy_version(os.path.join(source, str(latest)), base, version)
  servers = {
    name: model_server.Server(args, os.path.join(tmp, f"{name}.log"))
    for name, args in _write_configs(tmp, base).items()
    if name in _SERVERS.value
  }
  try:
    for server in servers.values():
      server.wait_ready(timeout_s=300)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(model_server.digits_pixels(1)))
    stubs = {name: serving_latency._stubs(s, FLAGS.channels) for name, s in servers.items()}
    rates = {name: [] for name in servers}
    cpu_ms = {name: [] for name in servers}  # The server process's CPU per request, by round.
    errors = 0
    for _ in range(_ROUNDS.value):
      for name, server in servers.items():
        cpu_before = process_cpu_seconds(server.proc.pid)
        rate, failed = serving_latency._throughput(
          stubs[name], request, _IN_FLIGHT.value, FLAGS.seconds, metadata=user_metadata
        )
        cpu = process_cpu_seconds(server.proc.pid) - cpu_before
        rates[name].append(rate)
        cpu_ms[name].append(cpu * 1e3 / max(rate * FLAGS.seconds, 1))
        errors += failed
    p50 = {}
    for name, server in servers.items():
      stub = server.predict_stub

      def call(stub=stub):
        return stub.Predict(request, timeout=30, metadata=[("x-user-id", "u1")])

      p50[name] = float(np.percentile(serving_latency._latencies(call, FLAGS.seconds), 50)) * 1e3
    report_cpu(cpu_ms)
    report(
      rates,
      p50,
      f"errors: {errors} (goals: policy/plain >= 0.95x, +<= 50 us p50; shadow p50 <= 1.05x)",
    )
  finally:
    for server in servers.values():
      server.stop()


def report_cpu(cpu_ms: dict[str, list[float]], baseline: str = "plain") -> None:
  """A markdown table of each server's CPU per request in the throughput rounds (median), the
  writer and shadow threads included: on a machine whose cores are shared with the client,
  this ratio is steadier than throughput and bounds it when the server is CPU-bound."""
  median = {name: statistics.median(values) for name, values in cpu_ms.items()}
  print("\nServer process CPU per request during the throughput rounds (ms, median):\n")
  print(f"| server | CPU ms / request | / {baseline} | rounds |")
  print("|---|---|---|---|")
  for name, value in median.items():
    rounds = ", ".join(f"{v:.3f}" for v in cpu_ms[name])
    print(f"| {name} | {value:.3f} | {value / median[baseline]:.3f} | {rounds} |")


def report(
  rates: dict[str, list[float]],
  p50_us: dict[str, float],
  footer: str,
  *,
  column: str = "server",
  baseline: str = "plain",
) -> None:
  """Markdown tables: median throughput of each `column` (server or path) over the rounds and
  its p50 at concurrency 1, both against `baseline`; then `footer`."""
  median = {name: statistics.median(r) for name, r in rates.items()}
  print(f"\nThroughput, {_IN_FLIGHT.value} one-row requests in flight (requests/s, median of")
  print(f"{_ROUNDS.value} alternating rounds of {FLAGS.seconds:g} s):\n")
  print(f"| {column} | requests/s | / {baseline} | rounds |")
  print("|---|---|---|---|")
  for name, rate in median.items():
    rounds = ", ".join(f"{r:.0f}" for r in rates[name])
    print(f"| {name} | {rate:.0f} | {rate / median[baseline]:.3f} | {rounds} |")
  print("\np50 latency at concurrency 1 (us):\n")
  print(f"| {column} | p50 us | vs {baseline} |")
  print("|---|---|---|")
  base = p50_us[baseline]
  for name, value in p50_us.items():
    print(f"| {name} | {value:.0f} | {value - base:+.0f} us, {value / base:.3f}x |")
  print(f"\n{footer}")


if __name__ == "__main__":
  app.run(main)
