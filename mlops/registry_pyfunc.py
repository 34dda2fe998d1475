"""The MLflow pyfunc flavor of a registered version: `predict` runs the SavedModel's signature,
so `mlflow.pyfunc.load_model("models:/digits@production").predict(x)` answers what a model
server answers.

MLflow stores this file in the version directory as a "models from code" file (no pickles: MLflow
3 refuses to unpickle by default) beside the SavedModel it serves; the model finds the SavedModel
as the directory this file sits in. `save_flavor` (called by `register`) writes it there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import mlflow
import numpy as np


class SavedModelPyfunc(mlflow.pyfunc.PythonModel):
  """predict(x): x is an array (the signature's single input), a dict of named arrays, or a
  DataFrame (its values as the single input); returns the signature's outputs by name."""

  def __init__(self, signature_name: str = "serving_default"):
    self.signature_name = signature_name

  def load_context(self, context) -> None:
    import tensorflow as tf

    directory = os.path.dirname(os.path.abspath(__file__))
    self._fn = tf.saved_model.load(directory).signatures[self.signature_name]

  def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
    import tensorflow as tf

    specs = self._fn.structured_input_signature[1]
    if hasattr(model_input, "to_numpy"):
      model_input = model_input.to_numpy()
    if not isinstance(model_input, dict):
      if len(specs) != 1:
        raise ValueError(f"{self.signature_name} takes inputs {sorted(specs)}; pass a dict")
      model_input = {next(iter(specs)): model_input}
    feed = {k: tf.constant(np.asarray(v), dtype=specs[k].dtype) for k, v in model_input.items()}
    return {k: v.numpy() for k, v in self._fn(**feed).items()}


FLAVOR_FILES = ("MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt")


def save_flavor(version_dir: str) -> None:
  """Adds the pyfunc flavor's files (MLmodel, environment files, this file) to a SavedModel
  version directory. Raises MlflowException when MLflow cannot save the flavor."""
  from importlib import metadata

  requirements = [f"mlflow=={mlflow.__version__}", f"tensorflow=={metadata.version('tensorflow')}"]
  with (
    tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(version_dir))) as tmp,
    warnings.catch_warnings(),
  ):
    # MLflow suggests type hints for its input validation; predict takes several input forms.
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")
    saved = os.path.join(tmp, "pyfunc")
    mlflow.pyfunc.save_model(
      saved, python_model=os.path.abspath(__file__), pip_requirements=requirements
    )
    for name in os.listdir(saved):
      target = os.path.join(version_dir, name)
      if os.path.exists(target):
        raise FileExistsError(f"{target} exists; the pyfunc flavor would overwrite it")
      shutil.move(os.path.join(saved, name), target)


if not __name__.startswith("mlops."):  # Executed by MLflow as the version's model code file.
  mlflow.models.set_model(SavedModelPyfunc())
