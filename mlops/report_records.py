"""What an experiment report is made from: the records a training run leaves in its workdir.

`read_run(workdir)` gathers the manifest (config, mesh, devices, data fingerprint), every scalar of
the TensorBoard event files (read with tensorboardX's protobufs: no TensorFlow), the checkpoints
and their eval metrics, and the MLflow run record. `classifier_eval` restores a checkpoint and
computes the confusion matrix on the eval split. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct

import numpy as np

from trainer import checkpointing, tracking
from trainer.errors import ConfigError

# Events of one TFRecord: u64 length, u32 crc, payload, u32 crc.
_HEADER = struct.Struct("<Q")
# Most eval examples the confusion matrix reads (bounds the report's time on big datasets).
_MAX_CONFUSION_EXAMPLES = 20_000


@dataclasses.dataclass(frozen=True)
class RunRecords:
  workdir: str
  manifest: dict
  config: dict
  # tag -> (steps, values), steps ascending; the last write of a step wins (resumes rewrite).
  scalars: dict[str, tuple[np.ndarray, np.ndarray]]
  checkpoint_steps: list[int]
  # checkpoint step -> the eval metrics saved with it.
  checkpoint_metrics: dict[int, dict[str, float]]
  mlflow_run: dict | None

  @property
  def is_language_model(self) -> bool:
    return self.config.get("data", {}).get("name") == "text"

  def series(self, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
    return self.scalars.get(tag)

  def last(self, tag: str) -> float | None:
    series = self.scalars.get(tag)
    return float(series[1][-1]) if series is not None and len(series[1]) else None


def read_run(workdir: str) -> RunRecords:
  """The records of the run in `workdir`; raises ConfigError when it holds no run."""
  path = os.path.join(workdir, "manifest.json")
  if not os.path.isfile(path):
    raise ConfigError(
      f"--workdir={workdir} holds no manifest.json; give a directory a run trained into"
    )
  with open(path) as f:
    manifest = json.load(f)
  steps = checkpointing.existing_steps(workdir)
  return RunRecords(
    workdir=os.path.abspath(workdir),
    manifest=manifest,
    config=manifest.get("config", {}),
    scalars=read_scalars(os.path.join(workdir, "tensorboard")),
    checkpoint_steps=steps,
    checkpoint_metrics={s: m for s in steps if (m := _checkpoint_metrics(workdir, s))},
    mlflow_run=tracking.read_run_file(workdir),
  )


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every scalar summary in the event files of `logdir`, by tag."""
  from tensorboardX.proto import event_pb2

  by_tag: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")), key=_event_order):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset + _HEADER.size + 4 <= len(data):
      (length,) = _HEADER.unpack_from(data, offset)
      start = offset + _HEADER.size + 4
      if start + length + 4 > len(data):
        break  # A record still being written.
      event = event_pb2.Event.FromString(data[start : start + length])
      offset = start + length + 4
      for value in event.summary.value:
        if value.WhichOneof("value") == "simple_value":
          by_tag.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
  return {
    tag: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
    for tag, points in by_tag.items()
  }


def _event_order(path: str) -> tuple[int, str]:
  """Event files sort by their creation timestamp (the field after `tfevents.`)."""
  stamp = os.path.basename(path).split(".")[3]
  return (int(stamp) if stamp.isdigit() else 0, path)


def _checkpoint_metrics(workdir: str, step: int) -> dict[str, float] | None:
  """The eval metrics saved with `step` (through checkpointing, the format's owner)."""
  try:
    return checkpointing.read_step_items(workdir, step)[2]
  except (ConfigError, OSError, ValueError):
    return None


@dataclasses.dataclass(frozen=True)
class ModelFacts:
  step: int
  parameter_count: int
  train_examples: int
  eval_examples: int


def model_facts(workdir: str, step: str = "best") -> tuple[ModelFacts, object, object]:
  """Restores `step` (best, else latest) for inference; returns its facts, model and dataset."""
  import jax

  from serving.export import loading
  from trainer.data import load_dataset

  try:
    model = loading.load(workdir, step)
  except ConfigError:
    model = loading.load(workdir, "latest")
  dataset = load_dataset(model.config.data)
  facts = ModelFacts(
    step=model.step,
    parameter_count=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.variables["params"])),
    train_examples=len(dataset.train),
    eval_examples=len(dataset.validation),
  )
  return facts, model, dataset


def classifier_eval(model, dataset, batch_size: int = 256) -> np.ndarray:
  """The confusion matrix (true x predicted) of `model` over the eval split (bounded)."""
  import jax

  from trainer import tasks

  task = tasks.for_spec(dataset.spec)
  count = min(len(dataset.validation), _MAX_CONFUSION_EXAMPLES)
  predict = jax.jit(
    lambda variables, batch: model.model.apply(
      variables, *task.model_inputs(batch)[0], train=False
    ).argmax(-1)
  )
  num_classes = dataset.spec.num_classes
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for start in range(0, count, batch_size):
    rows = [dataset.validation[i] for i in range(start, min(start + batch_size, count))]
    inputs = np.stack([r["inputs"] for r in rows])
    labels = np.array([int(r["labels"]) for r in rows])
    predicted = np.asarray(predict(model.variables, {"inputs": inputs}))
    np.add.at(confusion, (labels, predicted), 1)
  return confusion
