"""Loads a trained checkpoint for export onto whatever devices this process has.

The checkpoint format belongs to trainer/checkpointing/; this module only names what export
uses of it. A checkpoint written by any mesh (8 devices, 2 processes, ...) restores here onto one
device, and nothing but the checkpoint is needed (the data spec travels with it).
"""

from __future__ import annotations

from trainer import checkpointing
from trainer.checkpointing import InferenceModel, StepChoice

__all__ = ["InferenceModel", "StepChoice", "load", "resolve_step"]


def resolve_step(workdir: str, step: str | int | None = None) -> StepChoice:
  """See checkpointing.resolve_step: None picks the best step when the run kept one."""
  return checkpointing.resolve_step(workdir, step)


def load(workdir: str, step: str | int | None = None) -> InferenceModel:
  """Restores step `step` of the run in `workdir` onto this process's first device."""
  return checkpointing.restore_for_inference(workdir, step)
