"""Per-example predictions of a restored model on one split, for paired statistical tests.

The validation gate (mlops) compares a candidate with a baseline on the same test examples:
McNemar's test needs each example's correctness, a paired bootstrap each example's loss. Both
come from `predict_split`:

  predictions = evaluation.predict_split("runs/digits", split="test")      # best step
  predictions.correct, predictions.loss, predictions.fingerprint

The split is re-read from the run's saved data config, and its fingerprint is checked against
the one recorded at training time, so a gate never scores a different test set by accident.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from trainer import checkpointing
from trainer.checkpointing import InferenceModel
from trainer.data import load_dataset
from trainer.data import pipeline as input_pipeline
from trainer.errors import ConfigError

_BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Predictions:
  """One row per example of the split, in the split's order."""

  split: str
  step: int
  # The split's data fingerprint as recorded in the checkpoint (None for older checkpoints).
  fingerprint: str | None
  # Each example's summed loss, correct predictions and weight (1 per classified example; the
  # predicted tokens of a language model's row).
  loss: np.ndarray
  correct: np.ndarray
  weight: np.ndarray
  # Classifiers only: logits and softmax probabilities (examples, classes) and labels.
  logits: np.ndarray | None = None
  probabilities: np.ndarray | None = None
  labels: np.ndarray | None = None

  def metrics(self) -> dict[str, float]:
    """Weighted loss and accuracy over the split (what training's eval reports)."""
    total = max(float(self.weight.sum()), 1.0)
    return {"loss": float(self.loss.sum()) / total, "accuracy": float(self.correct.sum()) / total}


def predict_split(
  workdir_or_model: str | InferenceModel,
  *,
  split: str = "test",
  step: str | int | None = None,
  batch_size: int = _BATCH_SIZE,
) -> Predictions:
  """Runs the model of a run (`workdir`, at `step`: see checkpointing.resolve_step, default the
  best step) or an already restored InferenceModel over `split` on this process's first device.

  Raises ConfigError when the split does not exist (npz data without config.data.test_path)
  or its data no longer matches the fingerprint recorded at training time.
  """
  model = workdir_or_model
  if isinstance(model, str):
    model = checkpointing.restore_for_inference(model, step)
  dataset = load_dataset(model.config.data)
  try:
    source = dataset.split(split)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  recorded = model.data_spec.fingerprints.get(split)
  current = dataset.spec.fingerprints.get(split)
  if recorded is not None and recorded != current:
    raise ConfigError(
      f"the {split} split read now (fingerprint {current}) is not the one step {model.step} "
      f"was trained with ({recorded}); restore the data files that run used"
    )
  task = model.task
  device = jax.local_devices()[0]

  @jax.jit
  def per_example(variables, batch):
    args, kwargs = task.model_inputs(batch)
    outputs = model.model.apply(variables, *args, train=False, **kwargs)
    return task.per_example(outputs, batch)

  rows = []
  sharding = jax.sharding.SingleDeviceSharding(device)
  for batch in input_pipeline.eval_batches(source, global_batch_size=batch_size, sharding=sharding):
    real = np.asarray(batch["mask"]).astype(bool)
    outputs = jax.device_get(per_example(model.variables, batch))
    rows.append({k: np.asarray(v)[real] for k, v in outputs.items()})
  columns = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  return Predictions(
    split=split,
    step=model.step,
    fingerprint=recorded,
    loss=columns.pop("loss"),
    correct=columns.pop("correct"),
    weight=columns.pop("weight"),
    **columns,
  )
