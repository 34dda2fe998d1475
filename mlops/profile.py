r"""The reference profile of a model version: `assets.extra/profile.json` in every export.

The monitor compares logged traffic against it, so the reference statistics are versioned with
the model they describe. Written by the exporter (serving/export/exporter.py calls
`write_profile` on the finished SavedModel before the version is renamed into place); added to an
older export with

  python -m mlops.profile --saved_model=/models/digits/3 [--workdir=RUN]

Schema (`SCHEMA_VERSION` 1; a reader refuses other versions):

  schema_version: 1
  model: {kind: classification|language_model, num_classes, checkpoint_step, eval_metrics,
          heldout_accuracy (the SavedModel's accuracy on the predictions' split), pad_id}
  input: {name, dtype, row_shape}      the serving signature's input, per row (logs must match)
  groups: {group: [feature, ...]}       "inputs" (one feature per flattened input value) for
                                        classifiers; "tokens" and "sequence_length" for LMs
  predictions: {group: [feature, ...]}  the served outputs on the held-out split (test, else
                                        validation; source.eval_split): "classes"
                                        (classifiers) / "next_token" (LMs), and "confidence"
                                        (max probability)
  source: {training_rows, eval_rows, eval_split, data_fingerprint}

and each feature:

  name, kind (numeric|categorical), count, mean, std, min, max (over finite values),
  nan_share, inf_share,
  bins: {edges, counts}       10-20 bins between training quantiles (numeric features); the outer
                              bins are open-ended when traffic is binned against them
  quantiles: {levels, values} the quantile function at `levels` (QUANTILE_LEVELS; numeric
                              features; what KS and Wasserstein run against)
  sample: [...]               all training values, sorted, when there are at most
                              MAX_SAMPLE_ROWS (numeric features without a value table)
  values: {values, counts}    the exact value table when a feature takes at most
                              MAX_EXACT_VALUES distinct values (then tests are exact); the top
                              frequencies of integer or categorical features (truncated to
                              TOP_VALUES, `other_count` the rest)

Why in mlops and not serving/export: the monitor reads exactly what this module writes, so the
schema lives in one place; this module needs numpy only (TensorFlow and the data loaders are
imported inside the functions that run the SavedModel or read training data), and never MLflow,
so the exporter pays nothing for importing it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from absl import logging

from serving import contract

PROFILE_FILE = contract.PROFILE_FILE
ASSETS_EXTRA = contract.ASSETS_EXTRA_DIR
SCHEMA_VERSION = 1
NUM_BINS = 16
# Every half percent, and denser in the tails: Wasserstein distances from a uniform grid alone
# overestimate by ~0.004 (of a std) on 10^5 rows because the outermost interval is stretched to
# the sample minimum; with the tail levels the error is below 0.0005.
_TAIL_LEVELS = np.array([1e-4, 3e-4, 1e-3, 2e-3, 3e-3])
QUANTILE_LEVELS = np.unique(
  np.concatenate([np.linspace(0, 1, 201), _TAIL_LEVELS, 1 - _TAIL_LEVELS])
)
MAX_EXACT_VALUES = 32
TOP_VALUES = 64
# Categorical features (tokens, classes) keep their whole table up to this many values.
MAX_CATEGORIES = 1024
# A numeric feature of at most this many training rows keeps them all (sorted): tests against
# small references are then exact, as against the raw data.
MAX_SAMPLE_ROWS = 2000
# Caps on rows read: enough for stable quantiles, bounded export time.
MAX_TRAINING_ROWS = 100_000
MAX_LM_TRAINING_ROWS = 4096  # rows of seq_len tokens each
MAX_PREDICTION_ROWS = 4096
MAX_LM_PREDICTION_ROWS = 128
PREDICT_BATCH = 256


class ProfileError(ValueError):
  """A missing or unreadable profile; the message names the command that writes one."""


def resolve_registered(reference: str) -> tuple[str, str, int]:
  """(export directory, model name, version) of `name@alias` or `name/version` through the
  MLflow model registry (mlops/registry_store.py). Raises ProfileError with the registry's
  message (unknown name, alias or version; unreachable store)."""
  from mlops import registry_store

  try:
    found = registry_store.resolve_reference(registry_store.client(), reference)
  except registry_store.RegistryError as e:
    raise ProfileError(str(e)) from e
  return found.source, found.name, int(found.version)


def profile_path(saved_model: str) -> str:
  return contract.profile_path(saved_model)


def add_profile_command(saved_model: str) -> str:
  """The command that adds a profile (`--name=... --version=...` does the same by registry)."""
  return f"python -m mlops.profile --saved_model={saved_model}"


def read_profile(saved_model: str) -> dict:
  """The profile of an export. Raises ProfileError (with the command that adds one) if absent."""
  path = profile_path(saved_model)
  if not os.path.isfile(path):
    raise ProfileError(
      f"{saved_model} has no reference profile ({ASSETS_EXTRA}/{PROFILE_FILE}); it predates "
      f"profiles. Add one with: {add_profile_command(saved_model)}"
    )
  with open(path) as f:
    profile = json.load(f)
  if profile.get("schema_version") != SCHEMA_VERSION:
    raise ProfileError(
      f"{path} has schema_version {profile.get('schema_version')}, this reader knows "
      f"{SCHEMA_VERSION}; rewrite it with: {add_profile_command(saved_model)} --overwrite"
    )
  return profile


# ---------------------------------------------------------------------------------------------
# Features: how inputs (training rows or logged requests) become columns. Shared with the monitor.


def input_groups(kind: str, values: np.ndarray, pad_id: int | None = None) -> dict:
  """{group: 2-D float64 matrix [n, features]} of a batch of the signature's input.

  Classifiers: one column per flattened input value. Language models: every non-padding token
  (one column, categorical) and each row's length (one column).
  """
  values = np.asarray(values)
  if kind == "language_model":
    tokens = values.reshape(len(values), -1)
    real = tokens != pad_id if pad_id is not None else np.ones(tokens.shape, bool)
    return {
      "tokens": tokens[real].astype(np.float64)[:, None],
      "sequence_length": real.sum(axis=1).astype(np.float64)[:, None],
    }
  return {"inputs": values.reshape(len(values), -1).astype(np.float64)}


def output_groups(kind: str, outputs: dict[str, np.ndarray]) -> dict:
  """{group: matrix} of the served outputs whose distribution the profile keeps."""
  if kind == "language_model":
    log_probs = np.asarray(outputs["log_probs"])
    return {
      "next_token": np.argmax(log_probs, -1).astype(np.float64)[:, None],
      "confidence": np.exp(log_probs.max(-1)).astype(np.float64)[:, None],
    }
  # A logged Classify has `scores` where a Predict has `probabilities`: this project's classify
  # signatures score with the same softmax (serving/export/signatures.py).
  probabilities = outputs["probabilities"] if "probabilities" in outputs else outputs["scores"]
  return {
    "classes": np.asarray(outputs["classes"]).astype(np.float64).reshape(-1, 1),
    "confidence": np.asarray(probabilities).max(-1).astype(np.float64).reshape(-1, 1),
  }


CATEGORICAL_GROUPS = ("tokens", "next_token", "classes")


def feature_names(group: str, width: int) -> list[str]:
  return [group] if width == 1 else [f"{group}[{i}]" for i in range(width)]


# ---------------------------------------------------------------------------------------------
# Column statistics (vectorized over columns).


def describe(matrix: np.ndarray, group: str) -> list[dict]:
  """Profiles every column of `matrix` [n, features] (see the module docstring)."""
  matrix = np.asarray(matrix, np.float64)
  n, width = matrix.shape
  finite = np.isfinite(matrix)
  clean = np.where(finite, matrix, np.nan)
  with np.errstate(all="ignore"), _quiet_nan_warnings():
    stats = {
      "mean": np.nanmean(clean, 0),
      "std": np.nanstd(clean, 0),
      "min": np.nanmin(clean, 0),
      "max": np.nanmax(clean, 0),
    }
    quantile = np.quantile if finite.all() else np.nanquantile  # nanquantile is ~5x slower
    quantiles = quantile(clean, QUANTILE_LEVELS, axis=0)  # (levels, features)
  nan_share = np.isnan(matrix).mean(0) if n else np.zeros(width)
  inf_share = np.isinf(matrix).mean(0) if n else np.zeros(width)
  features = []
  for j, name in enumerate(feature_names(group, width)):
    column = clean[finite[:, j], j]
    feature = {
      "name": name,
      "kind": "numeric",
      "count": int(n),
      **{k: _num(v[j]) for k, v in stats.items()},
      "nan_share": float(nan_share[j]),
      "inf_share": float(inf_share[j]),
    }
    feature.update(_distribution(column, quantiles[:, j], categorical=group in CATEGORICAL_GROUPS))
    features.append(feature)
  return features


def _distribution(column: np.ndarray, quantiles: np.ndarray, *, categorical: bool) -> dict:
  values, counts = np.unique(column, return_counts=True)
  integer = bool(len(column)) and bool(np.all(column == np.round(column)))
  out: dict = {}
  # Evidently's rule: a numeric column of at most 5 distinct values is judged as categorical.
  if categorical or (integer and len(values) <= 5):
    out["kind"] = "categorical"
  if len(values) <= MAX_EXACT_VALUES or categorical or integer:
    keep = MAX_CATEGORIES if categorical else max(TOP_VALUES, MAX_EXACT_VALUES)
    kept = np.sort(np.argsort(-counts, kind="stable")[:keep])
    out["values"] = {
      "values": values[kept].tolist(),
      "counts": counts[kept].tolist(),
      "other_count": int(counts.sum() - counts[kept].sum()),
      # Exact: the table is the whole distribution (tests against it are exact).
      "exact": len(kept) == len(values) and (categorical or len(values) <= MAX_EXACT_VALUES),
    }
  if out.get("kind") != "categorical" and len(column):
    edges = np.unique(np.quantile(column, np.linspace(0, 1, NUM_BINS + 1)))
    out["bins"] = {"edges": edges.tolist(), "counts": bin_counts(column, edges).tolist()}
    out["quantiles"] = {"levels": QUANTILE_LEVELS.tolist(), "values": quantiles.tolist()}
    if len(column) <= MAX_SAMPLE_ROWS and "values" not in out:
      out["sample"] = np.sort(column).tolist()
  return out


def bin_counts(column: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Counts of `column` in the bins between `edges`, the outer two bins open-ended (a value
  below the training minimum counts in the first bin); one bin when there is one edge."""
  if len(edges) < 2:
    return np.array([len(column)])
  return np.bincount(np.searchsorted(edges[1:-1], column, side="right"), minlength=len(edges) - 1)


def _num(value) -> float | None:
  value = float(value)
  return value if np.isfinite(value) else None


class _quiet_nan_warnings:
  """All-NaN columns are legitimate (a feature that is always missing): no RuntimeWarning."""

  def __enter__(self):
    import warnings

    self._catch = warnings.catch_warnings()
    self._catch.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)

  def __exit__(self, *exc):
    self._catch.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Building a profile from an export.


@dataclasses.dataclass(frozen=True)
class ProfileInputs:
  """What a profile is computed from."""

  kind: str
  input_name: str
  input_dtype: str
  row_shape: tuple[int | None, ...]
  training_inputs: np.ndarray
  eval_inputs: np.ndarray
  pad_id: int | None
  num_classes: int
  checkpoint_step: int | None
  eval_metrics: dict | None
  data_fingerprint: str | None
  # Labels of `eval_inputs` (classifiers), for the held-out accuracy the monitor compares with.
  eval_labels: np.ndarray | None = None
  eval_split: str = "test"


def build_profile(inputs: ProfileInputs, predict) -> dict:
  """The profile dict. `predict(batch) -> {output: array}` runs the served signature."""
  groups = {}
  for group, matrix in input_groups(inputs.kind, inputs.training_inputs, inputs.pad_id).items():
    groups[group] = describe(matrix, group)
  limit = MAX_LM_PREDICTION_ROWS if inputs.kind == "language_model" else MAX_PREDICTION_ROWS
  eval_rows = inputs.eval_inputs[:limit]
  outputs = _predict_in_batches(predict, eval_rows)
  predictions = {
    group: describe(matrix, group) for group, matrix in output_groups(inputs.kind, outputs).items()
  }
  accuracy = None
  if inputs.eval_labels is not None and "classes" in outputs:
    labels = np.asarray(inputs.eval_labels)[: len(eval_rows)]
    accuracy = float(np.mean(np.asarray(outputs["classes"]).reshape(-1) == labels))
  return {
    "schema_version": SCHEMA_VERSION,
    "model": {
      "kind": inputs.kind,
      "num_classes": inputs.num_classes,
      "checkpoint_step": inputs.checkpoint_step,
      "eval_metrics": inputs.eval_metrics,
      "heldout_accuracy": accuracy,
      "pad_id": inputs.pad_id,
    },
    "input": {
      "name": inputs.input_name,
      "dtype": inputs.input_dtype,
      "row_shape": list(inputs.row_shape),
    },
    "groups": groups,
    "predictions": predictions,
    "source": {
      "training_rows": len(inputs.training_inputs),
      "eval_rows": len(eval_rows),
      "eval_split": inputs.eval_split,
      "data_fingerprint": inputs.data_fingerprint,
    },
  }


def _predict_in_batches(predict, rows: np.ndarray) -> dict[str, np.ndarray]:
  """Runs `predict` over fixed-size batches (the last one padded: one compiled shape)."""
  parts: dict[str, list] = {}
  for start in range(0, len(rows), PREDICT_BATCH):
    batch = rows[start : start + PREDICT_BATCH]
    size = PREDICT_BATCH if len(rows) > PREDICT_BATCH else len(batch)
    padded = np.concatenate([batch, np.repeat(batch[:1], size - len(batch), 0)])
    for name, value in predict(padded).items():
      parts.setdefault(name, []).append(np.asarray(value)[: len(batch)])
  return {name: np.concatenate(values) for name, values in parts.items()}


def write_profile_file(saved_model: str, profile: dict) -> str:
  """Writes `assets.extra/profile.json` atomically (temp + rename); returns its path."""
  path = profile_path(saved_model)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(profile, f, separators=(",", ":"))
  os.replace(tmp, path)
  logging.info("Wrote the reference profile %s", path)
  return path


# ---------------------------------------------------------------------------------------------
# CLI: add a profile to an export that predates them.


def main(argv: list[str]) -> None:
  """`python -m mlops.profile --saved_model=BASE/N [--workdir=RUN] [--overwrite]`."""
  import sys

  from absl import flags

  from mlops import profile_export

  values = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(1)
  saved_model = values.saved_model
  try:
    if values.name and not saved_model:
      reference = f"{values.name}/{values.version}" if values.version else values.name
      saved_model = resolve_registered(reference)[0]
    if not saved_model:
      raise ProfileError("--saved_model=BASE/VERSION (an export directory) is required")
    if not os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
      raise ProfileError(f"--saved_model={saved_model} is not a SavedModel directory")
    if os.path.exists(profile_path(saved_model)) and not values.overwrite:
      raise ProfileError(f"{profile_path(saved_model)} exists; pass --overwrite to recompute it")
    path = profile_export.write_profile(saved_model, workdir=values.workdir)
  except ProfileError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path}")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("saved_model", None, "The export (BASE/VERSION) to profile.")
  flags.DEFINE_string("name", None, "A registered model (MLflow registry) instead.")
  flags.DEFINE_integer("version", None, "Its version (with --name); default: the newest.")
  flags.DEFINE_string(
    "workdir", None, "The training run, when the export's manifest lacks a usable config."
  )
  flags.DEFINE_bool("overwrite", False, "Recompute an existing profile.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
