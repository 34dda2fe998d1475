"""Gate thresholds for the digits classifiers. The test split holds 270 images (15%): a 95% bound
on a paired accuracy difference is about +-2 points when two models disagree on ~6 of them, and
a class has only ~27 images, so its bound is wide (losing 4 of them to the candidate fails)."""

from configs.gates import base


def get_gate_config():
  config = base.get_base_gate_config()
  config.quality.floors = {"accuracy": 0.9}
  config.quality.max_regression = {"accuracy": 0.03, "loss": 0.1}
  config.quality.max_class_regression = 0.25
  return config
