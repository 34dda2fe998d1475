"""Random-access data sources: the digits that ship with scikit-learn, synthetic data, user files.

Every source yields examples `{"inputs": float32 array, "labels": int32 scalar}` and knows its
normalization, so the jitted step (and later the export) applies the same preprocessing.

User files:
  * `.npz` with two arrays (`config.data.inputs_key`, `config.data.labels_key`), one file or a glob;
  * ArrayRecord, one msgpack record per example as written by `write_array_record`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from flax import serialization

from trainer.errors import ConfigError

# Bytes read from each end of a user file for its fingerprint: cheap on terabytes, and any
# rewrite of a file in practice changes its size, its head or its tail.
_FINGERPRINT_EDGE_BYTES = 1 << 20


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


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: ArraySource | ArrayRecordSource
  eval: ArraySource | ArrayRecordSource
  num_classes: int
  input_shape: tuple[int, ...]
  # Inputs are normalized as (x - mean) / std on device.
  mean: float
  std: float
  # Identifies the data read, for the run manifest.
  fingerprint: str
  # classification: {"inputs", "labels"} examples, num_classes labels.
  # language_model: packed token rows (see text_data), num_classes = vocabulary size.
  kind: str = "classification"
  # The shape a served model takes per example, when it differs from input_shape (digits: the
  # 64 values of sklearn's `digits.data` rows, reshaped to 8x8x1 inside the exported function).
  serving_input_shape: tuple[int, ...] | None = None

  def spec(self) -> dict:
    """What inference needs to know about the data, saved with every checkpoint."""
    return {
      "kind": self.kind,
      "num_classes": self.num_classes,
      "input_shape": list(self.input_shape),
      "serving_input_shape": list(self.serving_input_shape or self.input_shape),
      "mean": self.mean,
      "std": self.std,
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


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Opens the dataset `config.data.name`; raises ConfigError for unknown names or bad paths."""
  from trainer.data import text as text_data  # The LM's sources live beside their tokenizer.

  loaders = {
    "text": text_data.load_text_dataset,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "npz": _load_npz,
    "array_record": _load_array_record,
  }
  if config.name not in loaders:
    raise ConfigError(
      f"unknown dataset {config.name!r} (config.data.name); choose one of {sorted(loaders)}"
    )
  dataset = loaders[config.name](config)
  # User overrides win over each dataset's default normalization.
  overrides = {k: config[k] for k in ("mean", "std") if config[k] is not None}
  if overrides.get("std", 1.0) == 0:
    raise ConfigError("config.data.std=0 would divide by zero; set a positive std")
  return dataclasses.replace(dataset, **overrides)


def _load_digits(config: ml_collections.ConfigDict) -> Dataset:
  from sklearn import datasets  # Deferred: only this source needs scikit-learn.

  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1), values 0..16
  labels = digits.target.astype(np.int32)
  # A fixed 80/20 split that does not move with config.seed, so test accuracy compares across runs.
  order = np.random.default_rng(config.split_seed).permutation(len(labels))
  num_test = len(labels) // 5
  test, train = order[:num_test], order[num_test:]
  return Dataset(
    train=ArraySource(images[train], labels[train]),
    eval=ArraySource(images[test], labels[test]),
    num_classes=10,
    input_shape=images.shape[1:],
    mean=0.0,
    std=16.0,
    fingerprint=_fingerprint_arrays(images[train], labels[train], images[test], labels[test]),
    serving_input_shape=(64,),
  )


def _load_synthetic(config: ml_collections.ConfigDict) -> Dataset:
  """Gaussian clusters around one random prototype per class: learnable, any shape."""
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

  train, evaluation = split(config.synthetic_train_examples), split(config.synthetic_eval_examples)
  return Dataset(
    train=train,
    eval=evaluation,
    num_classes=num_classes,
    input_shape=shape,
    mean=0.0,
    std=1.0,
    fingerprint=_fingerprint_arrays(train.inputs, train.labels, evaluation.inputs),
  )


def _load_npz(config: ml_collections.ConfigDict) -> Dataset:
  splits = {}
  for split in ("train", "eval"):
    paths = _resolve_paths(config, split)
    arrays = [_read_npz(path, config) for path in paths]
    for path, (inputs, _) in zip(paths[1:], arrays[1:], strict=True):
      if inputs.shape[1:] != arrays[0][0].shape[1:]:
        raise ConfigError(
          f"{path} holds examples of shape {inputs.shape[1:]} but {paths[0]} of shape "
          f"{arrays[0][0].shape[1:]}; every file of config.data.{split}_path needs the same shape"
        )
    inputs = np.concatenate([x for x, _ in arrays])
    labels = np.concatenate([y for _, y in arrays])
    splits[split] = (ArraySource(inputs, labels), paths)
  train_shape, eval_shape = splits["train"][0].inputs.shape[1:], splits["eval"][0].inputs.shape[1:]
  if train_shape != eval_shape:
    raise ConfigError(
      f"config.data.train_path holds examples of shape {train_shape} but config.data.eval_path "
      f"of shape {eval_shape}; both splits need the same shape"
    )
  (train, train_paths), (evaluation, eval_paths) = splits["train"], splits["eval"]
  num_classes = config.num_classes or int(max(train.labels.max(), evaluation.labels.max())) + 1
  return Dataset(
    train=train,
    eval=evaluation,
    num_classes=num_classes,
    input_shape=train.inputs.shape[1:],
    mean=0.0,
    std=1.0,
    fingerprint=_fingerprint_files([*train_paths, *eval_paths]),
  )


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


def _load_array_record(config: ml_collections.ConfigDict) -> Dataset:
  if config.num_classes < 2:
    raise ConfigError(
      "array_record data needs config.data.num_classes (>= 2): the label count is not "
      "stored in the records"
    )
  train_paths, eval_paths = _resolve_paths(config, "train"), _resolve_paths(config, "eval")
  try:
    train, evaluation = ArrayRecordSource(train_paths), ArrayRecordSource(eval_paths)
    first, first_eval = train[0], evaluation[0]
  except Exception as e:  # array_record raises bare RuntimeErrors/ValueErrors on bad files.
    raise ConfigError(f"cannot read ArrayRecord files {train_paths + eval_paths}: {e}") from e
  if first["inputs"].shape != first_eval["inputs"].shape:
    raise ConfigError(
      f"config.data.train_path holds examples of shape {first['inputs'].shape} but "
      f"config.data.eval_path of shape {first_eval['inputs'].shape}; both need the same shape"
    )
  return Dataset(
    train=train,
    eval=evaluation,
    num_classes=config.num_classes,
    input_shape=first["inputs"].shape,
    mean=0.0,
    std=1.0,
    fingerprint=_fingerprint_files([*train_paths, *eval_paths]),
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


def _fingerprint_arrays(*arrays: np.ndarray) -> str:
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return "sha256:" + digest.hexdigest()


def _fingerprint_files(paths: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for path in paths:
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
      digest.update(f.read(_FINGERPRINT_EDGE_BYTES))
      if size > 2 * _FINGERPRINT_EDGE_BYTES:
        f.seek(-_FINGERPRINT_EDGE_BYTES, os.SEEK_END)
        digest.update(f.read())
  return "sha256-edges:" + digest.hexdigest()
