"""Computes an export's reference profile from its training data and its own SavedModel.

Called by the exporter on the finished (not yet renamed) SavedModel, and by
`python -m mlops.profile` for an export that predates profiles. The training data is opened
from the config in the export's manifest (or the run's, with `workdir`); the prediction
distribution comes from TensorFlow running the exported signature on the eval split: the same
program the server runs.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mlops import profile as profile_lib
from serving import contract

SIGNATURE = "serving_default"


def _manifest(saved_model: str, workdir: str | None) -> dict:
  path = contract.export_manifest_path(saved_model)
  if not os.path.isfile(path):
    raise profile_lib.ProfileError(
      f"{saved_model} has no {profile_lib.ASSETS_EXTRA}/manifest.json; give an export directory "
      "written by `python -m serving.export` (BASE/VERSION)"
    )
  with open(path) as f:
    manifest = json.load(f)
  if workdir:
    run_manifest = os.path.join(workdir, "manifest.json")
    if not os.path.isfile(run_manifest):
      raise profile_lib.ProfileError(f"--workdir={workdir} has no manifest.json")
    with open(run_manifest) as f:
      manifest["config"] = json.load(f)["config"]
  return manifest


def _sample(source, max_rows: int, key: str = "inputs") -> np.ndarray:
  """Up to `max_rows` values of `key` spread evenly over a data source."""
  indices = np.unique(np.linspace(0, len(source) - 1, min(len(source), max_rows)).astype(np.int64))
  if hasattr(source, "take"):
    return np.asarray(source.take(indices)[key])
  return np.stack([np.asarray(source[int(i)][key]) for i in indices])


def profile_inputs(saved_model: str, signature, workdir: str | None = None):
  """The ProfileInputs of an export (opens its training data). Raises ProfileError."""
  import ml_collections

  from trainer.data import load_dataset
  from trainer.errors import ConfigError

  manifest = _manifest(saved_model, workdir)
  spec = manifest["data_spec"]
  try:
    dataset = load_dataset(ml_collections.ConfigDict(manifest["config"]["data"]))
  except (ConfigError, OSError) as e:
    raise profile_lib.ProfileError(
      f"the training data of {saved_model} cannot be read ({e}); give the run's --workdir or "
      "make the data reachable"
    ) from e
  (input_name, tensor_spec), *_ = signature.structured_input_signature[1].items()
  row_shape = tuple(None if d is None else int(d) for d in tensor_spec.shape[1:])
  kind = spec["kind"]
  dtype = np.dtype(tensor_spec.dtype.as_numpy_dtype)
  serving_shape = [d or -1 for d in row_shape]

  def as_served(x):
    return np.asarray(x).reshape(len(x), *serving_shape).astype(dtype)

  # Predictions on the split the held-out accuracy is reported on: test when the data has one.
  split = "test" if dataset.test is not None else "validation"
  held_out = dataset.split(split)
  labels = None
  if kind != "language_model":
    labels = _sample(held_out, profile_lib.MAX_PREDICTION_ROWS, "labels").astype(np.int64)
  pad_id, max_rows = None, profile_lib.MAX_TRAINING_ROWS
  if kind == "language_model":
    from trainer.data import text

    pad_id, max_rows = text.PAD_ID, profile_lib.MAX_LM_TRAINING_ROWS
  return profile_lib.ProfileInputs(
    kind=kind,
    input_name=input_name,
    input_dtype=dtype.name,
    row_shape=row_shape,
    training_inputs=as_served(_sample(dataset.train, max_rows)),
    eval_inputs=as_served(_sample(held_out, profile_lib.MAX_PREDICTION_ROWS)),
    eval_labels=labels,
    eval_split=split,
    pad_id=pad_id,
    num_classes=spec["num_classes"],
    checkpoint_step=manifest.get("checkpoint_step"),
    eval_metrics=manifest.get("eval_metrics"),
    data_fingerprint=manifest.get("data_fingerprint"),
  )


def write_profile(saved_model: str, *, workdir: str | None = None) -> str:
  """Computes and writes `assets.extra/profile.json` of the export in `saved_model`; returns
  its path. Raises ProfileError when the manifest or the training data is missing."""
  import tensorflow as tf

  loaded = tf.saved_model.load(saved_model)
  signature = loaded.signatures[SIGNATURE]
  inputs = profile_inputs(saved_model, signature, workdir)

  def predict(batch: np.ndarray) -> dict[str, np.ndarray]:
    outputs = signature(**{inputs.input_name: tf.constant(batch)})
    return {name: value.numpy() for name, value in outputs.items()}

  profile = profile_lib.build_profile(inputs, predict)
  return profile_lib.write_profile_file(saved_model, profile)
