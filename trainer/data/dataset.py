"""The types every data source produces: a `Dataset` of three splits and its `DataSpec`.

`DataSpec` is what inference needs to know about the data without reading it (the kind of task,
input shape and dtype, classes or vocabulary, normalization); it is saved with every checkpoint
and read back by export, evaluation and the registry. `Dataset` adds the splits themselves:
`train` (what the optimizer sees), `validation` (what picks the best checkpoint and drives early
stopping) and `test` (held out from every choice training makes: for the final report, the
validation gate and the model card).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"
KINDS = (CLASSIFICATION, LANGUAGE_MODEL)
SPLITS = ("train", "validation", "test")

# Bytes read from each end of a user file for its fingerprint: cheap on terabytes, and any
# rewrite of a file in practice changes its size, its head or its tail.
_FINGERPRINT_EDGE_BYTES = 1 << 20


def normalize(inputs: Any, mean: float, std: float) -> Any:
  """The preprocessing classification training applies, `(x - mean) / std` in float32; the
  export runs this same function. Works on jax and numpy arrays alike."""
  return (inputs.astype("float32") - mean) / std


class Source(Protocol):
  """Random access to the examples of one split: `{name: array}` per example.

  Sources that also offer `take(indices)` (stacked examples in one vectorized read) are read a
  whole batch at a time (see pipeline.take).
  """

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a model trained on a dataset takes and predicts; saved with every checkpoint."""

  # CLASSIFICATION ({"inputs", "labels"} examples) or LANGUAGE_MODEL (packed token rows).
  kind: str
  # One example's model input: (8, 8, 1) for digits, (seq_len,) token ids for language models.
  input_shape: tuple[int, ...]
  input_dtype: str
  # Classes of a classifier, or the vocabulary size of a language model (the model's outputs).
  num_classes: int
  # Inputs are normalized as (x - mean) / std on device (classification).
  mean: float = 0.0
  std: float = 1.0
  # The shape a served model takes per example, when it differs from input_shape (digits: the
  # 64 values of sklearn's `digits.data` rows, reshaped to 8x8x1 inside the exported function).
  serving_input_shape: tuple[int, ...] | None = None
  # The fingerprint of each split read, by split name; the gate identifies the test split by it.
  fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown data kind {self.kind!r}; expected one of {KINDS}")
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    if self.serving_input_shape is None:
      object.__setattr__(self, "serving_input_shape", self.input_shape)
    object.__setattr__(self, "serving_input_shape", tuple(self.serving_input_shape))

  @property
  def vocab_size(self) -> int:
    """A language model's vocabulary (its number of output classes)."""
    return self.num_classes

  @property
  def seq_len(self) -> int:
    """A language model's training sequence length."""
    return self.input_shape[0]

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict (what checkpoints store); `from_json` reads it back."""
    out = dataclasses.asdict(self)
    out["input_shape"] = list(self.input_shape)
    out["serving_input_shape"] = list(self.serving_input_shape)
    return out

  @classmethod
  def from_json(cls, saved: dict[str, Any]) -> DataSpec:
    """Reads `to_json`'s dict, and the untyped dicts older checkpoints saved (no dtype, no
    fingerprints). Raises ValueError for a dict that is neither."""
    try:
      kind = saved.get("kind", CLASSIFICATION)
      default_dtype = "int32" if kind == LANGUAGE_MODEL else "float32"
      return cls(
        kind=kind,
        input_shape=tuple(saved["input_shape"]),
        input_dtype=saved.get("input_dtype", default_dtype),
        num_classes=int(saved["num_classes"]),
        mean=float(saved.get("mean", 0.0)),
        std=float(saved.get("std", 1.0)),
        serving_input_shape=tuple(saved.get("serving_input_shape") or saved["input_shape"]),
        fingerprints=dict(saved.get("fingerprints") or {}),
      )
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a data spec: {saved!r} ({e!r} missing or malformed)") from e


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The three splits of a dataset and their spec. `test` is None for user data that gives no
  test files (npz / array_record without config.data.test_path)."""

  train: Source
  validation: Source
  test: Source | None
  spec: DataSpec

  @property
  def fingerprint(self) -> str:
    """One fingerprint of every split read (the run manifest's `data_fingerprint`)."""
    digest = hashlib.sha256()
    for split in SPLITS:
      digest.update(f"{split}={self.spec.fingerprints.get(split, '')};".encode())
    return "sha256:" + digest.hexdigest()

  def split(self, name: str) -> Source:
    """The split `name` (train, validation or test); ValueError when it does not exist."""
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
    source = getattr(self, name)
    if source is None:
      raise ValueError(
        f"this dataset has no {name} split; npz and array_record data have one when "
        "config.data.test_path names its files"
      )
    return source


def fingerprint_arrays(*arrays: np.ndarray) -> str:
  """A content hash of in-memory arrays (their shapes, dtypes and bytes)."""
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return "sha256:" + digest.hexdigest()


def fingerprint_files(paths: Sequence[str]) -> str:
  """A hash of files' names, sizes and first and last MiB (cheap on terabytes)."""
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
