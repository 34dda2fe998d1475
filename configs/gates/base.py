"""What every gate config holds; digits.py and lm.py set the thresholds that suit them.

Quality metrics a gate may name: classifiers `accuracy` (higher is better) and `loss`; language
models `loss` and `perplexity` (lower is better). Regressions are judged on the confidence
bound of the paired difference (McNemar's pairs for accuracy, a paired bootstrap for loss and
perplexity), not on the point value.
"""

import ml_collections


def get_base_gate_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.confidence = 0.95  # Of every confidence interval.
  config.bootstrap_samples = 1000
  config.seed = 0

  config.quality = ml_collections.ConfigDict()
  # metric -> absolute bound: a minimum for higher-is-better metrics, a maximum otherwise.
  config.quality.floors = {}
  # metric -> largest allowed regression versus the baseline (absolute units of the metric),
  # on the pessimistic end of the confidence interval.
  config.quality.max_regression = {}
  # Classifiers: largest allowed drop of one class's accuracy (confidence bound), versus the
  # baseline; None turns the check off.
  config.quality.max_class_regression = None

  config.served = ml_collections.ConfigDict()
  config.served.enabled = True
  config.served.golden_examples = 16
  # Largest relative error of the server's float answers (gRPC and REST) versus JAX's.
  config.served.parity_tolerance = 1e-4
  config.served.latency_batch_sizes = (1, 32)
  config.served.latency_requests = 100  # Per batch size and version, interleaved.
  # Candidate / baseline latency, served by the same server in the same run.
  # p99 of 100 requests is the second-slowest one: on a shared machine allow it more.
  config.served.max_latency_ratio = {"p50": 1.5, "p99": 3.0}

  config.compatibility = ml_collections.ConfigDict()
  config.compatibility.tf_serving = "2.20"  # The TF Serving release production runs.
  config.compatibility.allow_signature_change = False
  return config
