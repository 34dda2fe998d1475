"""Thresholds a 20-step smoke model can meet (tests and `make run`'s quick paths): the same
checks with floors near chance, so the gate's machinery is exercised end to end."""

from configs.gates import base


def get_gate_config():
  config = base.get_base_gate_config()
  config.quality.floors = {"accuracy": 0.2}
  config.quality.max_regression = {"accuracy": 0.05, "loss": 0.2}
  config.quality.max_class_regression = 0.3
  config.served.latency_requests = 10
  config.served.max_latency_ratio = {"p50": 3.0, "p99": 5.0}
  return config
