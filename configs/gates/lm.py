"""Gate thresholds for the byte-level language models (configs/lm.py): perplexity is over 256
byte values, so a floor of 200 only rejects a model no better than uniform guessing."""

from configs.gates import base


def get_gate_config():
  config = base.get_base_gate_config()
  config.quality.floors = {"perplexity": 200.0}
  config.quality.max_regression = {"loss": 0.05}
  config.served.latency_batch_sizes = (1, 8)
  config.served.golden_examples = 4
  return config
