r"""Exports a trained checkpoint as a TF SavedModel version that TF Serving can load.

  python -m serving.export --workdir=/tmp/run1 --export_base=/models/digits \
      [--version=7] [--step=best|latest|1200]

The step defaults to the run's best checkpoint (by eval.best_metric on the validation split)
when it kept one (checkpoint.keep_best > 0), else the latest; the output says which.
  python -m serving.export --check_tf_serving=2.19 --saved_model=/models/digits/1

Writes `<export_base>/<version>/` (the layout `tensorflow_model_server --model_base_path` reads)
through orbax-export and jax2tf native serialization (XlaCallModule ops). The version is built in
a temporary directory, checked, and renamed into place only when complete and correct: an
existing version is never overwritten, and a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import jax
from absl import logging

from serving import contract
from serving.export import compatibility, loading, parity, signatures
from trainer.errors import ConfigError

# Golden examples from the eval split: the parity gate runs them, warmup replays a few.
NUM_GOLDEN = 8
NUM_WARMUP = 2


@dataclasses.dataclass(frozen=True)
class ExportResult:
  path: str
  version: int
  step: int
  # How the step was chosen: "best", "latest" or "requested".
  step_reason: str
  signatures: list[str]
  # Worst relative error of each float output in the parity gate.
  parity: dict[str, float]
  seconds: float


def next_version(export_base: str) -> int:
  """One more than the largest numeric version directory (1 for an empty base)."""
  versions = [int(name) for name in os.listdir(export_base) if name.isdigit()]
  return max(versions, default=0) + 1


def export(
  workdir: str,
  export_base: str,
  *,
  step: str | int | None = None,
  version: int | None = None,
  max_new_tokens: int = 32,
  platforms: tuple[str, ...] = ("cpu",),
  calling_convention_version: int | None = None,
) -> ExportResult:
  """Exports step `step` of the run in `workdir` as `<export_base>/<version>`: "best",
  "latest", a step number, or None for the best step when the run kept one, else the latest.

  Raises ConfigError for a missing workdir or step, an unwritable base or an existing version;
  parity.ParityError when the SavedModel's outputs differ from JAX's. Either way nothing is
  left in `export_base`.
  """
  start = time.perf_counter()
  # Fail on a bad workdir or step before touching the base.
  choice = loading.resolve_step(workdir, step)
  if version is not None and version < 1:
    raise ConfigError(f"--version={version} must be a positive integer")
  _prepare_base(export_base)
  model = loading.load(workdir, choice.step)
  version = version if version is not None else next_version(export_base)
  final_path = os.path.join(export_base, str(version))
  if os.path.exists(final_path):
    raise ConfigError(
      f"{final_path} already exists; versions are never overwritten. Omit --version to take "
      f"the next one ({next_version(export_base)})"
    )
  signature_list = build_signatures(model, max_new_tokens)
  tmp_path = tempfile.mkdtemp(prefix=f".export-{version}-", dir=export_base)
  try:
    with _calling_convention(calling_convention_version):
      _save_saved_model(model, signature_list, tmp_path, platforms)
    set_method_names(tmp_path, {s.name: s.method_name for s in signature_list})
    errors = parity.check(tmp_path, model.variables, signature_list, dtype=model.config.model.dtype)
    _write_assets(tmp_path, model, signature_list, workdir, platforms, errors)
    _write_profile(tmp_path, final_path)
    os.rename(tmp_path, final_path)  # Atomic on one filesystem: servers never see half a model.
  except BaseException:
    shutil.rmtree(tmp_path, ignore_errors=True)
    raise
  return ExportResult(
    path=final_path,
    version=version,
    step=model.step,
    step_reason=choice.reason,
    signatures=[s.name for s in signature_list],
    parity=errors,
    seconds=time.perf_counter() - start,
  )


def _prepare_base(export_base: str) -> None:
  try:
    os.makedirs(export_base, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"cannot create --export_base={export_base}: {e.strerror}") from e
  if not os.access(export_base, os.W_OK | os.X_OK):
    raise ConfigError(
      f"--export_base={export_base} is not writable; fix its permissions or choose another"
    )


class _calling_convention:
  """Temporarily exports with another XlaCallModule calling convention (for older servers)."""

  def __init__(self, version: int | None):
    self.version = version

  def __enter__(self):
    self.previous = jax.config.jax_export_calling_convention_version
    if self.version is not None:
      jax.config.update("jax_export_calling_convention_version", self.version)

  def __exit__(self, *exc):
    jax.config.update("jax_export_calling_convention_version", self.previous)


def build_signatures(
  model: loading.InferenceModel, max_new_tokens: int
) -> list[signatures.Signature]:
  """The signatures the model's task serves, with golden inputs from its held-out data."""
  from trainer.data import load_dataset

  try:
    dataset = load_dataset(model.config.data)
  except (ConfigError, OSError) as e:
    logging.warning("Held-out data unavailable (%s); golden inputs are seeded random ones.", e)
    dataset = None
  task = model.task
  golden = task.golden_inputs(dataset, NUM_GOLDEN)
  return task.serving_signatures(model, golden, max_new_tokens=max_new_tokens)


def _save_saved_model(model, signature_list, path: str, platforms: tuple[str, ...]) -> None:
  import orbax.export as oex
  import tensorflow as tf

  module = oex.JaxModule(
    model.variables,
    {s.name: s.fn for s in signature_list},
    input_polymorphic_shape={s.name: s.polymorphic_shapes for s in signature_list},
    jax2tf_kwargs={s.name: {"native_serialization_platforms": platforms} for s in signature_list},
  )
  configs = [
    oex.ServingConfig(
      signature_key=s.name,
      method_key=s.name,
      input_signature=[
        {
          name: tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)
          for name, (shape, dtype) in s.inputs.items()
        }
      ],
      tf_preprocessor=s.tf_preprocessor,
      tf_postprocessor=s.tf_postprocessor,
    )
    for s in signature_list
  ]
  oex.ExportManager(module, configs).save(path)


def set_method_names(path: str, method_names: dict[str, str]) -> None:
  """Sets the method_name of the SavedModel's signatures in `path/saved_model.pb` (and updates
  its fingerprint.pb): tf.saved_model.save writes tensorflow/serving/predict for every signature,
  but TF Serving's Classify and Regress RPCs need tensorflow/serving/classify and .../regress.

  `method_names` maps signature name -> method name. Raises KeyError for a signature the
  SavedModel lacks.
  """
  from tensorflow.core.protobuf import saved_model_pb2
  from tensorflow.python.saved_model import fingerprinting_utils

  pb_path = os.path.join(path, contract.SAVED_MODEL_FILE)
  with open(pb_path, "rb") as f:
    saved_model = saved_model_pb2.SavedModel.FromString(f.read())
  changed = False
  for meta_graph in saved_model.meta_graphs:
    for name, method_name in method_names.items():
      if name not in meta_graph.signature_def:
        raise KeyError(
          f"{path} has no signature {name!r}; it has {sorted(meta_graph.signature_def)}"
        )
      signature_def = meta_graph.signature_def[name]
      changed |= signature_def.method_name != method_name
      signature_def.method_name = method_name
  if not changed:
    return
  with open(pb_path, "wb") as f:
    f.write(saved_model.SerializeToString(deterministic=True))
  if os.path.exists(os.path.join(path, contract.FINGERPRINT_FILE)):
    fingerprinting_utils.write_fingerprint(path)  # It hashes saved_model.pb and the signatures.


def _write_assets(tmp_path, model, signature_list, workdir, platforms, errors) -> None:
  """`assets.extra/`: warmup requests TF Serving replays, and where this version came from."""
  os.makedirs(os.path.join(tmp_path, contract.ASSETS_EXTRA_DIR), exist_ok=True)
  _write_warmup_requests(contract.warmup_path(tmp_path), signature_list)
  run_manifest = {}
  manifest_path = os.path.join(workdir, "manifest.json")
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      run_manifest = json.load(f)
  export_manifest = contract.ExportManifest(
    checkpoint_step=model.step,
    eval_metrics=model.metrics,
    config=model.config.to_dict(),
    data_spec=model.data_spec.to_json(),
    data_fingerprint=run_manifest.get("data_fingerprint"),
    git=run_manifest.get("git"),
    training_packages=run_manifest.get("packages"),
    workdir=os.path.abspath(workdir),
    signatures={s.name: s.doc for s in signature_list},
    parity_max_relative_error=errors,
    export=compatibility.export_info(platforms),
    parameter_count=sum(int(leaf.size) for leaf in jax.tree.leaves(model.variables)),
  )
  with open(contract.export_manifest_path(tmp_path), "w") as f:
    json.dump(export_manifest.to_dict(), f, indent=2, sort_keys=True, default=str)


def _write_profile(tmp_path: str, final_path: str) -> None:
  """`assets.extra/profile.json`, the monitor's reference (mlops/profile.py has the schema)."""
  from mlops import profile, profile_export

  try:
    profile_export.write_profile(tmp_path)
  except profile.ProfileError as e:
    logging.warning(
      "No reference profile: %s. Add one later with: %s", e, profile.add_profile_command(final_path)
    )


def _write_warmup_requests(path: str, signature_list) -> None:
  """One PredictLog per signature (TF Serving's Predict runs classify signatures too)."""
  import tensorflow as tf
  from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

  with tf.io.TFRecordWriter(path) as writer:
    for s in signature_list:
      request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=s.name))
      for name, value in s.golden_inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value[:NUM_WARMUP]))
      log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
      )
      writer.write(log.SerializeToString())
