"""Gate thresholds for the digits classifiers (test split of ~270 images: a 95% bound on a
paired accuracy difference is about +-2 points when two models disagree on ~15 images)."""

from configs.gates import base


def get_gate_config():
  config = base.get_base_gate_config()
  config.quality.floors = {"accuracy": 0.9}
  config.quality.max_regression = {"accuracy": 0.03, "loss": 0.1}
  config.quality.max_class_regression = 0.15
  return config
