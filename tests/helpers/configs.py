"""Small configs for tests and the helper processes they start."""

from configs import digits_cnn


def smoke_config(overrides: dict):
  """The digits smoke config with `{"section.field": value}` overrides applied."""
  config = digits_cnn.get_config("smoke")
  config.data.worker_threads = 0
  config.tracking.report = False  # Seconds of plotting per run; tests of the report enable it.
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config
