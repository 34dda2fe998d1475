"""Where a run's checkpoints live and the Orbax CheckpointManager that reads and writes them: one
item handler per item of a step, the same best-step tracking for the writer and every reader."""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def existing_steps(workdir: str) -> list[int]:
  """Complete checkpoint steps in `workdir`, read without creating or changing anything."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  # A plain directory listing, no CheckpointManager: in a multi-process job another process may
  # be creating the directory right now, and managers synchronize processes when created.
  return sorted(ocp.path.step.checkpoint_steps(directory))


def open_manager(
  directory: str,
  *,
  read_only: bool,
  async_save: bool = False,
  state_handler: ocp.CheckpointHandler | None = None,
  **options,
) -> ocp.CheckpointManager:
  handlers = {
    "state": state_handler or ocp.StandardCheckpointHandler(),
    "data_iter": grain.checkpoint.CheckpointHandler(),
    "config": ocp.JsonCheckpointHandler(),
    "loop_state": ocp.JsonCheckpointHandler(),
    "data_spec": ocp.JsonCheckpointHandler(),
  }
  if read_only:
    # A reader runs in whichever processes call it (the end-of-run report runs in process 0
    # only): its barriers must not wait for the other processes of a multi-process job.
    this_process = jax.process_index()
    options.setdefault(
      "multiprocessing_options",
      ocp.options.MultiprocessingOptions(
        primary_host=this_process, active_processes={this_process}
      ),
    )
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(
      read_only=read_only,
      create=not read_only,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
      **options,
    ),
    item_handlers=handlers,
  )


def best_tracking(best_metric: str, best_mode: str, keep_best: int) -> dict:
  """The CheckpointManager options that make Orbax track the best step: the same for the writer
  and every reader, so both agree on which step is best. Empty when the run keeps no best."""
  if keep_best <= 0:
    return {}
  return dict(best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode)
