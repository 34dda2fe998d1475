"""Classification data: the digits that ship with scikit-learn, synthetic data, user files.

Every source yields examples `{"inputs": float32 array, "labels": int32 scalar}`; each dataset
knows its normalization, so the jitted step (and later the export) applies the same preprocessing.
Each has three splits (see dataset.Dataset): digits and synthetic data split by
`config.data.split_seed`, user files by path (`train_path`, `eval_path` for validation, and an
optional `test_path`).

User files:
  * `.npz` with two arrays (`config.data.inputs_key`, `config.data.labels_key`), one file or a glob;
  * ArrayRecord, one msgpack record per example as written by `write_array_record`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from flax import serialization

from trainer.data.dataset import (
  CLASSIFICATION,
  Dataset,
  DataSpec,
  fingerprint_arrays,
  fingerprint_files,
)
from trainer.errors import ConfigError

# Digits: the share of examples in each held-out split (the rest trains).
DIGITS_VALIDATION_FRACTION = 0.15
DIGITS_TEST_FRACTION = 0.15


class ArraySource:
  """Examples held in memory as two aligned arrays."""

  def __init__(self, inputs: np.ndarray, labels: np.ndarray):
    if len(inputs) != len(labels):
      raise ConfigError(f"{len(inputs)} inputs but {len(labels)} labels; they must align")
    self.inputs = np.asarray(inputs, np.float32)
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"inputs": self.inputs[index], "labels": self.labels[index]}

  @property
  def arrays(self) -> dict[str, np.ndarray]:
    """The examples as aligned arrays: `take(indices)` is each one indexed by `indices`."""
    return {"inputs": self.inputs, "labels": self.labels}

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Many examples in one vectorized read."""
    return {"inputs": self.inputs[indices], "labels": self.labels[indices]}


class ArrayRecordSource:
  """Examples stored one msgpack record each in ArrayRecord files."""

  def __init__(self, paths: Sequence[str]):
    import grain  # Deferred: opening ArrayRecord readers is the only use.

    self._records = grain.sources.ArrayRecordDataSource(list(paths))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = serialization.msgpack_restore(self._records[index])
    return {
      "inputs": np.asarray(example["inputs"], np.float32),
      "labels": np.asarray(example["labels"], np.int32),
    }


def write_array_record(path: str, inputs: np.ndarray, labels: np.ndarray) -> None:
  """Writes aligned examples to one ArrayRecord file in the format `ArrayRecordSource` reads."""
  from array_record.python import array_record_module

  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  try:
    for x, y in zip(inputs, labels, strict=True):
      record = {"inputs": np.asarray(x, np.float32), "labels": np.int32(y)}
      writer.write(serialization.msgpack_serialize(record))
  finally:
    writer.close()


def load_digits(config: ml_collections.ConfigDict) -> Dataset:
  """sklearn's 1797 8x8 digits, split 70/15/15 (train/validation/test) by config.split_seed."""
  from sklearn import datasets  # Deferred: only this source needs scikit-learn.

  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1), values 0..16
  labels = digits.target.astype(np.int32)
  # A fixed split that does not move with config.seed, so test accuracy compares across runs.
  order = np.random.default_rng(config.split_seed).permutation(len(labels))
  num_test = round(len(labels) * DIGITS_TEST_FRACTION)
  num_validation = round(len(labels) * DIGITS_VALIDATION_FRACTION)
  indices = {
    "test": order[:num_test],
    "validation": order[num_test : num_test + num_validation],
    "train": order[num_test + num_validation :],
  }
  splits = {name: ArraySource(images[i], labels[i]) for name, i in indices.items()}
  return _classification_dataset(
    splits,
    {name: fingerprint_arrays(s.inputs, s.labels) for name, s in splits.items()},
    num_classes=10,
    std=16.0,
    serving_input_shape=(64,),
  )


def load_synthetic(config: ml_collections.ConfigDict) -> Dataset:
  """Gaussian clusters around one random prototype per class: learnable, any shape. The
  validation and test splits each hold config.synthetic_eval_examples examples."""
  shape = tuple(config.synthetic_input_shape)
  num_classes = config.synthetic_num_classes
  if num_classes < 2 or not shape or min(shape) < 1:
    raise ConfigError(
      f"synthetic data needs >= 2 classes and a non-empty positive shape, got "
      f"config.data.synthetic_num_classes={num_classes}, synthetic_input_shape={shape}"
    )
  rng = np.random.default_rng(config.split_seed)
  prototypes = rng.normal(size=(num_classes, *shape)).astype(np.float32)

  def split(num_examples: int) -> ArraySource:
    labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
    noise = rng.normal(scale=1.5, size=(num_examples, *shape)).astype(np.float32)
    return ArraySource(prototypes[labels] + noise, labels)

  sizes = {
    "train": config.synthetic_train_examples,
    "validation": config.synthetic_eval_examples,
    "test": config.synthetic_eval_examples,
  }
  splits = {name: split(size) for name, size in sizes.items()}
  return _classification_dataset(
    splits,
    {name: fingerprint_arrays(s.inputs, s.labels) for name, s in splits.items()},
    num_classes=num_classes,
  )


def load_npz(config: ml_collections.ConfigDict) -> Dataset:
  """`.npz` files by split: train_path, eval_path (validation) and optionally test_path."""
  splits, fingerprints = {}, {}
  for split, paths in _split_paths(config).items():
    arrays = [_read_npz(path, config) for path in paths]
    for path, (inputs, _) in zip(paths[1:], arrays[1:], strict=True):
      if inputs.shape[1:] != arrays[0][0].shape[1:]:
        raise ConfigError(
          f"{path} holds examples of shape {inputs.shape[1:]} but {paths[0]} of shape "
          f"{arrays[0][0].shape[1:]}; every file of config.data.{_PATH_FIELDS[split]} needs "
          "the same shape"
        )
    inputs = np.concatenate([x for x, _ in arrays])
    labels = np.concatenate([y for _, y in arrays])
    splits[split] = ArraySource(inputs, labels)
    fingerprints[split] = fingerprint_files(paths)
  _check_same_shapes({split: s.inputs.shape[1:] for split, s in splits.items()})
  num_classes = config.num_classes or int(max(s.labels.max() for s in splits.values())) + 1
  return _classification_dataset(splits, fingerprints, num_classes=num_classes)


def _read_npz(path: str, config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, labels) of one .npz file, checked; ConfigError naming the file for any problem."""
  try:
    arrays = np.load(path)
    if not isinstance(arrays, np.lib.npyio.NpzFile):
      raise ConfigError(f"{path} is a single .npy array, not an .npz archive; save with np.savez")
    with arrays:
      for key in (config.inputs_key, config.labels_key):
        if key not in arrays.files:
          raise ConfigError(
            f"{path} has no array {key!r}; its arrays are {sorted(arrays.files)}. Set "
            "config.data.inputs_key / config.data.labels_key to the right names"
          )
      inputs, labels = arrays[config.inputs_key], arrays[config.labels_key]
  except ConfigError:
    raise
  except Exception as e:  # numpy and zipfile raise many kinds for a damaged or truncated file.
    raise ConfigError(
      f"cannot read {path} as .npz ({type(e).__name__}: {e}); check that the file is complete "
      "and was written by np.savez"
    ) from e
  if inputs.ndim < 2 or labels.ndim != 1 or len(inputs) != len(labels) or not len(labels):
    raise ConfigError(
      f"{path}: {config.inputs_key!r} has shape {inputs.shape} and {config.labels_key!r} "
      f"{labels.shape}; need (examples, ...) inputs and (examples,) labels, same non-zero count"
    )
  if not np.issubdtype(inputs.dtype, np.number):
    raise ConfigError(
      f"{path}: inputs {config.inputs_key!r} have dtype {inputs.dtype}, not numbers"
    )
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
    raise ConfigError(
      f"{path}: labels {config.labels_key!r} must be integers >= 0 (class ids), got dtype "
      f"{labels.dtype} with minimum {labels.min()}"
    )
  if config.num_classes and labels.max() >= config.num_classes:
    raise ConfigError(
      f"{path}: label {labels.max()} >= config.data.num_classes={config.num_classes}; raise "
      "num_classes or set it to 0 to infer it"
    )
  return inputs, labels


def load_array_record(config: ml_collections.ConfigDict) -> Dataset:
  """ArrayRecord files by split: train_path, eval_path (validation), optionally test_path."""
  if config.num_classes < 2:
    raise ConfigError(
      "array_record data needs config.data.num_classes (>= 2): the label count is not "
      "stored in the records"
    )
  paths = _split_paths(config)
  try:
    splits = {split: ArrayRecordSource(p) for split, p in paths.items()}
    firsts = {split: source[0] for split, source in splits.items()}
  except Exception as e:  # array_record raises bare RuntimeErrors/ValueErrors on bad files.
    every = [path for p in paths.values() for path in p]
    raise ConfigError(f"cannot read ArrayRecord files {every}: {e}") from e
  _check_same_shapes({split: first["inputs"].shape for split, first in firsts.items()})
  first = firsts["train"]
  return _classification_dataset(
    splits,
    {split: fingerprint_files(p) for split, p in paths.items()},
    num_classes=config.num_classes,
    input_shape=first["inputs"].shape,
  )


def _classification_dataset(
  splits: dict,
  fingerprints: dict[str, str],
  *,
  num_classes: int,
  input_shape: tuple[int, ...] | None = None,
  std: float = 1.0,
  serving_input_shape: tuple[int, ...] | None = None,
) -> Dataset:
  train = splits["train"]
  spec = DataSpec(
    kind=CLASSIFICATION,
    input_shape=input_shape or train.inputs.shape[1:],
    input_dtype="float32",
    num_classes=num_classes,
    mean=0.0,
    std=std,
    serving_input_shape=serving_input_shape,
    fingerprints=fingerprints,
  )
  return Dataset(train=train, validation=splits["validation"], test=splits.get("test"), spec=spec)


# The config field naming each split's files.
_PATH_FIELDS = {"train": "train_path", "validation": "eval_path", "test": "test_path"}


def _split_paths(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """The files of each split: train and validation (eval_path) required, test optional."""
  paths = {"train": _resolve_paths(config, "train"), "validation": _resolve_paths(config, "eval")}
  if config.get("test_path"):
    paths["test"] = _resolve_paths(config, "test")
  return paths


def _check_same_shapes(shapes: dict[str, tuple[int, ...]]) -> None:
  """ConfigError when the splits' examples differ in shape, naming the config fields."""
  train = shapes["train"]
  for split, shape in shapes.items():
    if shape != train:
      raise ConfigError(
        f"config.data.train_path holds examples of shape {train} but "
        f"config.data.{_PATH_FIELDS[split]} of shape {shape}; all splits need the same shape"
      )


def _resolve_paths(config: ml_collections.ConfigDict, split: str) -> list[str]:
  field = f"{split}_path"
  pattern = config[field]
  if not pattern:
    raise ConfigError(
      f"config.data.name={config.name!r} reads files: set config.data.{field} to a path or glob"
    )
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise ConfigError(
      f"config.data.{field}={pattern!r} matches no file; check the path (globs are allowed)"
    )
  for path in paths:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
      raise ConfigError(
        f"config.data.{field}: {path} is not a readable file; fix its permissions or the path"
      )
  return paths
