"""Training data: `load_dataset(config.data)` opens a `Dataset` (dataset.py) by name.

Classification sources live in sources.py, language-model text in text.py, and the grain
pipelines that feed sharded batches to the steps in pipeline.py.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from trainer.data import sources, text
from trainer.data.dataset import Dataset, DataSpec
from trainer.errors import ConfigError

__all__ = ["DataSpec", "Dataset", "load_dataset"]

_LOADERS = {
  "text": text.load_text_dataset,
  "digits": sources.load_digits,
  "synthetic": sources.load_synthetic,
  "npz": sources.load_npz,
  "array_record": sources.load_array_record,
}


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Opens the dataset `config.name` (config is `config.data`); raises ConfigError for unknown
  names, bad paths or a zero std."""
  if config.name not in _LOADERS:
    raise ConfigError(
      f"unknown dataset {config.name!r} (config.data.name); choose one of {sorted(_LOADERS)}"
    )
  dataset = _LOADERS[config.name](config)
  # User overrides win over each dataset's default normalization.
  overrides = {k: config[k] for k in ("mean", "std") if config.get(k) is not None}
  if overrides.get("std", 1.0) == 0:
    raise ConfigError("config.data.std=0 would divide by zero; set a positive std")
  return dataclasses.replace(dataset, spec=dataclasses.replace(dataset.spec, **overrides))
