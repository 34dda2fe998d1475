"""The one owner of the checkpoint format: Orbax CheckpointManagers over a run's workdir.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter,config,data_spec,loop_state,metrics}`.
Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves only complete steps behind (the partial one is cleaned up on the next
start). No code outside this package reads these directories.

  * training (writer.py): `Checkpointer` (save/restore the train state and data iterator),
    `check_compatible`; `existing_steps` (layout.py);
  * everything after training (reader.py: export, evaluation, registry, gate, batch
    inference): `read_run_info(workdir)` (steps, latest and best step as Orbax tracks them,
    config, data spec), `resolve_step(workdir, "best" | "latest" | int | None)` and
    `restore_for_inference(workdir, step)` -> `InferenceModel` (params, or the EMA copy when
    training kept one, plus the model's state, on any device, without the optimizer state).

layout.py holds what both sides share: where the steps are, the manager with one handler per
item, and the best-step tracking, so the writer and every reader agree on which step is best.
"""

from trainer.checkpointing.layout import checkpoint_dir, existing_steps
from trainer.checkpointing.reader import (
  InferenceModel,
  RunInfo,
  StepChoice,
  read_run_info,
  read_step_items,
  resolve_step,
  restore_for_inference,
)
from trainer.checkpointing.writer import Checkpointer, check_compatible

__all__ = [
  "Checkpointer",
  "InferenceModel",
  "RunInfo",
  "StepChoice",
  "check_compatible",
  "checkpoint_dir",
  "existing_steps",
  "read_run_info",
  "read_step_items",
  "resolve_step",
  "restore_for_inference",
]
