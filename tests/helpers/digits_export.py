"""One trained and exported digits model per test session, shared by the monitoring and batch
inference tests (training and exporting cost most of their time)."""

from __future__ import annotations

import os

from tests.helpers.configs import smoke_config

# Enough steps that the model is decent (~90% test accuracy): a smoke model near chance predicts
# some classes almost never, which makes its prediction distribution a poor reference.
TRAIN_STEPS = 200


def digits_export(tmp_path_factory) -> str:
  """The path of version 1 of a digits model trained for TRAIN_STEPS; made by the first caller
  in the session (under pytest's session base temp), reused by the others."""
  import jax

  from serving.export import exporter
  from trainer import train

  root = tmp_path_factory.getbasetemp() / "shared_digits_export"
  saved_model = root / "models" / "digits" / "1"
  if not os.path.isdir(saved_model):  # The exporter renames a complete version into place.
    workdir = root / "run"
    config = smoke_config(
      {k: TRAIN_STEPS for k in ("train.num_steps", "eval.every_steps", "checkpoint.every_steps")}
    )
    train.train_and_evaluate(config, str(workdir), jax.devices()[:1])  # 1 device: faster here
    exporter.export(str(workdir), str(root / "models" / "digits"))
  return str(saved_model)


def workdir_of(saved_model: str) -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(saved_model))), "run")
