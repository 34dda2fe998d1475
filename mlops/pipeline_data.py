"""What a pipeline run trains on: the config's data, a user's .npz splits (`--data=DIR`), and
optionally the logged traffic that has feedback labels (`--include_feedback_logs=DIR
--feedback=FILE`).

`--data=DIR` holds `train.npz`, `validation.npz` and optionally `test.npz`, each with arrays
`inputs` and `labels` (the npz source's default keys). Logged rows with a feedback label are
added to the training split only: validation and test stay the user's files, so every version a
pipeline trains on the same DIR is judged by the gate on the same test split (the gate refuses
to compare versions evaluated on different test data). This is why feedback needs `--data`: the
built-in digits split has no file to add rows to.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

SPLIT_FILES = {"train_path": "train.npz", "eval_path": "validation.npz", "test_path": "test.npz"}


class DataError(ValueError):
  """Bad --data / feedback input: the CLI prints `error: <message>` and exits 1."""


@dataclasses.dataclass(frozen=True)
class TrainingData:
  overrides: list[str]  # --config.data.* flags for trainer.main
  feedback_rows: int  # logged rows with a label added to the training split


def check_inputs(data: str | None, feedback_logs: str | None, feedback: str | None) -> None:
  """Raises DataError for a missing DIR or file, or feedback without --data (cheap: before the
  pipeline takes its lock)."""
  if data is not None:
    if not os.path.isdir(data):
      raise DataError(f"--data={data} is not a directory; give one with train.npz, validation.npz")
    for required in ("train.npz", "validation.npz"):
      if not os.path.isfile(os.path.join(data, required)):
        raise DataError(f"--data={data} has no {required}; --data needs train.npz, validation.npz")
  if feedback_logs is None:
    if feedback is not None:
      raise DataError("--feedback is used with --include_feedback_logs=DIR (the logs it labels)")
    return
  if not os.path.isdir(feedback_logs):
    raise DataError(f"--include_feedback_logs={feedback_logs} is not a directory of logs")
  if feedback is None:
    raise DataError("--include_feedback_logs needs --feedback=FILE (request_id,label per row)")
  if data is None:
    raise DataError(
      "--include_feedback_logs needs --data=DIR (train/validation/test .npz): the config's "
      "built-in split has no file to add logged rows to"
    )


def prepare(
  data: str | None,
  feedback_logs: str | None,
  feedback: str | None,
  model_name: str,
  out_dir: str,
) -> TrainingData:
  """The trainer overrides for this run's data; writes `out_dir/train-*.npz` when feedback rows
  are added. Raises DataError (or prediction_log.LogError) for unusable inputs."""
  if data is None:
    return TrainingData([], 0)
  paths = split_paths(data)
  rows = 0
  if feedback_logs is not None:
    inputs, labels = labelled_rows(feedback_logs, feedback, model_name)
    rows = len(labels)
    with np.load(paths["train_path"]) as base:
      example_shape = base["inputs"].shape[1:]
    if rows and int(np.prod(inputs.shape[1:])) != int(np.prod(example_shape)):
      raise DataError(
        f"logged inputs have shape {inputs.shape[1:]}, {data}/train.npz examples {example_shape}: "
        "the logs are of another model or schema"
      )
    os.makedirs(out_dir, exist_ok=True)
    os.symlink(paths["train_path"], os.path.join(out_dir, "train-0-data.npz"))
    np.savez(
      os.path.join(out_dir, "train-1-feedback.npz"),
      inputs=inputs.reshape((rows, *example_shape)),
      labels=labels.astype(np.int32),
    )
    paths["train_path"] = os.path.join(out_dir, "train-*.npz")
  return TrainingData(file_overrides(paths), rows)


def split_paths(data: str) -> dict[str, str]:
  """{config.data field: file} of the splits `--data=DIR` holds."""
  data = os.path.abspath(data)
  return {
    field: os.path.join(data, file)
    for field, file in SPLIT_FILES.items()
    if os.path.isfile(os.path.join(data, file))
  }


def file_overrides(paths: dict[str, str]) -> list[str]:
  """The trainer's --config.data.* flags that read `paths` as .npz splits."""
  return ["--config.data.name=npz"] + [f"--config.data.{k}={v}" for k, v in paths.items()]


def labelled_rows(logs_dir: str, feedback: str, model_name: str) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, labels) of the logged primary rows of `model_name` that have a feedback label:
  its Predicts', then its Classifies' (their tf.Examples read in the Predicts' input shape;
  rows that do not fit it are left out, as the reader counts them)."""
  from mlops import feedback as feedback_lib
  from mlops import prediction_log

  logs = prediction_log.read_logs(logs_dir, model_name=model_name)
  parts = [logs]
  if logs.other_rpc_records:
    schema = {k: (v.dtype.name, v.shape[1:]) for k, v in logs.inputs.items()} or None
    parts.append(
      prediction_log.read_logs(logs_dir, model_name=model_name, input_schema=schema, rpc="Classify")
    )
  parts = [p for p in parts if len(p)]
  if not parts:
    raise DataError(f"--include_feedback_logs={logs_dir} holds no rows of model {model_name}")
  if any(len(p.inputs) != 1 for p in parts):
    names = sorted({name for p in parts for name in p.inputs})
    raise DataError(
      f"--include_feedback_logs={logs_dir}: logged requests have inputs {names}; "
      "training needs one input tensor"
    )
  entries = feedback_lib.read_feedback(feedback)
  inputs, labels = [], []
  for part in parts:
    part = part.select(part.role != "shadow")  # A mirrored request is the same example twice.
    joined = feedback_lib.join_feedback(part, entries)
    keep = joined.labels >= 0
    (values,) = part.inputs.values()
    inputs.append(np.asarray(values)[keep])
    labels.append(joined.labels[keep])
  if len({x.shape[1:] for x in inputs}) != 1:
    shapes = sorted({str(list(x.shape[1:])) for x in inputs})
    raise DataError(
      f"--include_feedback_logs={logs_dir}: Predict and Classify rows of shapes {shapes}; "
      "training needs one shape"
    )
  return np.concatenate(inputs), np.concatenate(labels)
