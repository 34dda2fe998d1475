"""What the exporter writes and the model server (and client) read: each shared name, once.

Plain Python on purpose: the exporter (JAX), the model server (TensorFlow only) and the client
all import this module, so it imports neither JAX nor TensorFlow nor any of their protos.

A model base path holds numeric version directories, each a TF SavedModel:

  <base_path>/<version>/saved_model.pb, variables/, fingerprint.pb
  <base_path>/<version>/assets.extra/tf_serving_warmup_requests   (PredictLogs TF Serving replays)
  <base_path>/<version>/assets.extra/manifest.json                (ExportManifest, this project's)
  <base_path>/<version>/assets.extra/profile.json                 (reference profile, mlops/profile.py)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Version directory layout (what `tensorflow_model_server --model_base_path` reads).
SAVED_MODEL_FILE = "saved_model.pb"
FINGERPRINT_FILE = "fingerprint.pb"
SERVE_TAG = "serve"
ASSETS_EXTRA_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
EXPORT_MANIFEST_FILE = "manifest.json"
# The reference profile the monitor judges traffic against (schema: mlops/profile.py).
PROFILE_FILE = "profile.json"
# TF Serving replays at most this many warmup records.
MAX_WARMUP_RECORDS = 1000

# Signature and method names (TF Serving's signature_constants).
DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD_NAME = "tensorflow/serving/predict"
CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"
REGRESS_METHOD_NAME = "tensorflow/serving/regress"
# The tensor names a Classify/Regress signature uses (kClassifyInputs, kClassifyOutputClasses,
# kClassifyOutputScores, kRegressInputs, kRegressOutputs).
CLASSIFY_INPUTS = "inputs"
CLASSIFY_OUTPUT_CLASSES = "classes"
CLASSIFY_OUTPUT_SCORES = "scores"
REGRESS_INPUTS = "inputs"
REGRESS_OUTPUTS = "outputs"
# SignatureDefs whose names start with this are TF's own (e.g. __saved_model_init_op).
INTERNAL_SIGNATURE_PREFIX = "__"


def version_dir(base_path: str, version: int) -> str:
  """The directory of `version` under a model base path."""
  return os.path.join(base_path, str(version))


def versions_in(names: Iterable[str]) -> set[int]:
  """The versions among directory entry names: those that are a decimal number."""
  return {int(name) for name in names if name.isdigit()}


def warmup_path(version_path: str) -> str:
  return os.path.join(version_path, ASSETS_EXTRA_DIR, WARMUP_FILE)


def export_manifest_path(version_path: str) -> str:
  return os.path.join(version_path, ASSETS_EXTRA_DIR, EXPORT_MANIFEST_FILE)


def profile_path(version_path: str) -> str:
  return os.path.join(version_path, ASSETS_EXTRA_DIR, PROFILE_FILE)


def resolve_signature_name(name: str) -> str:
  """A request's signature name; empty means `serving_default`, as in TF Serving."""
  return name or DEFAULT_SIGNATURE


def describe_shape(shape: Sequence[int] | None) -> str:
  """A signature tensor's shape as the server's errors and the client's table write it:
  `[-1, 64]` (-1: any size), or `unknown rank` for None."""
  return "unknown rank" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def describe_tensor(dtype_name: str, shape: Sequence[int] | None) -> dict[str, Any]:
  """One signature tensor as metadata summaries (client --metadata --json) list it."""
  return {"dtype": dtype_name, "shape": None if shape is None else list(shape)}


@dataclasses.dataclass(frozen=True)
class ExportManifest:
  """`assets.extra/manifest.json`: where a version came from (written by serving.export, read
  by people and by the lifecycle layer). Keys are these fields' names."""

  checkpoint_step: int
  eval_metrics: Mapping[str, Any]
  config: Mapping[str, Any]
  data_spec: Any
  data_fingerprint: str | None
  git: Mapping[str, Any] | None
  training_packages: Mapping[str, str] | None
  workdir: str
  # Signature name -> one line describing its inputs and outputs.
  signatures: Mapping[str, str]
  # Output (signature/name) -> worst relative error of the parity gate.
  parity_max_relative_error: Mapping[str, float]
  export: Mapping[str, Any]
  # Values in the SavedModel's variables (parameters and model state such as batch statistics),
  # counted at export so readers need not load TensorFlow; absent in older exports.
  parameter_count: int | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def keys(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))
