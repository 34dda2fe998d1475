"""The one owner of the checkpoint format: Orbax CheckpointManagers over a run's workdir.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter,config,data_spec,loop_state,metrics}`.
Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves only complete steps behind (the partial one is cleaned up on the next
start). No other module reads these directories.

Public API:
  * training: `Checkpointer` (save/restore the train state and data iterator),
    `existing_steps`, `check_compatible`;
  * everything after training (export, evaluation, registry, gate, batch inference):
    `read_run_info(workdir)` (steps, latest and best step as Orbax tracks them, config,
    data spec), `resolve_step(workdir, "best" | "latest" | int | None)` and
    `restore_for_inference(workdir, step)` -> `InferenceModel` (params, or the EMA copy when
    training kept one, plus the model's state, on any device, without the optimizer state).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization

import models
from trainer import tasks
from trainer.data.dataset import DataSpec
from trainer.errors import ConfigError
from trainer.train_state import TrainState

# Config sections whose differences explain a shape mismatch, in the order worth reading.
_EXPLAINING_SECTIONS = ("model", "data")


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


class Checkpointer:
  """Saves and restores `TrainState` + data iterator + config.

  Every process must construct it and call `save`/`restore`/`wait_until_finished` together:
  Orbax coordinates the processes and writes each array shard from the process that owns it.
  """

  def __init__(
    self,
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    best_metric: str,
    best_mode: str,
    data_spec: DataSpec | None = None,
  ):
    # Saved with every step, so inference (export) needs the checkpoint alone, not the data.
    self.data_spec = data_spec.to_json() if data_spec else {}
    policies = [ocp.checkpoint_managers.LatestN(n=config.keep_last)]
    if config.keep_best > 0:
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric],
          reverse=best_mode == "min",
          n=config.keep_best,
          keep_checkpoints_without_metrics=False,
        )
      )
    self._tracks_best = config.keep_best > 0
    # Metrics are recorded (and best_step tracked) only when keeping the best; otherwise Orbax
    # would warn at every save that no metrics came with it.
    tracking = _best_tracking(best_metric, best_mode, config.keep_best)
    self._manager = _manager(
      checkpoint_dir(workdir),
      read_only=False,
      async_save=config.async_save,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      **tracking,
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best step by the tracked metric; None when not keeping the best (Orbax would answer
    the latest step then) or no step carries metrics yet."""
    return self._manager.best_step() if self._tracks_best else None

  def save(
    self,
    state: TrainState,
    data_iterator: grain.DatasetIterator,
    config: ml_collections.ConfigDict,
    metrics: dict[str, float] | None = None,
    loop_state: dict | None = None,
  ) -> None:
    """Starts saving at `state.step`; returns once the arrays are copied off the device.

    Every process must call it at the same step (Orbax writes each process's shards and
    synchronizes them); the caller has checked the state is finite. With async saving the
    write finishes in the background: call `wait_until_finished` (or `close`) before reading
    the step back. `metrics` (the eval metrics of this step) rank it for keep_best.
    """
    step = int(jax.device_get(state.step))
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(serialization.to_state_dict(state)),
        data_iter=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        loop_state=ocp.args.JsonSave(loop_state or {}),
        data_spec=ocp.args.JsonSave(self.data_spec),
      ),
      metrics=metrics,
      force=True,
    )

  def restore(
    self,
    step: int,
    abstract_state: TrainState,
    data_iterator: grain.DatasetIterator,
  ) -> tuple[TrainState, dict]:
    """Restores `step` onto the shardings in `abstract_state` (any mesh, any process count).

    Returns the state and the loop's own state (e.g. early stopping) saved with it.

    The data iterator continues exactly where it stopped, also when the checkpoint was saved by
    a different number of processes: its state counts global batches consumed, and the global
    stream is the same whatever the process count (see input_pipeline.train_iterator).
    """
    items = {
      "state": ocp.args.StandardRestore(serialization.to_state_dict(abstract_state)),
      "loop_state": ocp.args.JsonRestore(),
    }
    saved_iterators = self._saved_iterator_states(step)
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own in saved_iterators:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if own not in saved_iterators:
      states = {json.dumps(json.loads(text), sort_keys=True) for text in saved_iterators.values()}
      if len(states) != 1:
        raise ValueError(f"step {step}: processes saved different data positions: {states}")
      logging.info(
        "Step %d was saved by %d process(es), this run has %d: resuming the data stream at %s.",
        step,
        len(saved_iterators),
        jax.process_count(),
        states,
      )
      data_iterator.set_state(json.loads(states.pop()))
    state = serialization.from_state_dict(abstract_state, restored["state"])
    return state, restored["loop_state"]

  def _saved_iterator_states(self, step: int) -> dict[str, str]:
    """`{process_i-of-n.json: state}` as saved with `step`."""
    directory = epath.Path(self._manager.directory) / str(step) / "data_iter"
    return {path.name: path.read_text() for path in directory.glob("process_*-of-*.json")}

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def check_compatible(
  workdir: str, step: int, abstract_state: TrainState, config: ml_collections.ConfigDict
) -> None:
  """Raises ConfigError naming the first parameter whose checkpointed shape differs."""
  directory = checkpoint_dir(workdir)
  with _manager(directory, read_only=True) as manager:
    metadata = manager.item_metadata(step)
    saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  saved = _shapes(metadata["state"])
  expected = _shapes(serialization.to_state_dict(abstract_state))
  mismatches = [
    f"{path}: checkpoint {saved.get(path, 'absent')}, this config {expected.get(path, 'absent')}"
    # Parameters first: they are what a user recognises in a model config.
    for path in sorted(
      saved.keys() | expected.keys(), key=lambda p: (not p.startswith("params/"), p)
    )
    if saved.get(path) != expected.get(path)
  ]
  if not mismatches:
    return
  config_diffs = _config_diffs(saved_config["config"], json.loads(config.to_json_best_effort()))
  raise ConfigError(
    f"{directory} holds step {step} of a run with an incompatible config: "
    f"{len(mismatches)} array(s) differ, first {mismatches[0]}."
    + (f" Config differences: {'; '.join(config_diffs)}." if config_diffs else "")
    + " Use a new --workdir, or the config that wrote this checkpoint."
  )


def _manager(
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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
    for path, leaf in flat
    if hasattr(leaf, "shape")
  }


def _config_diffs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  diffs = []
  for section in _EXPLAINING_SECTIONS:
    before, now = saved.get(section, {}), current.get(section, {})
    for key in sorted(before.keys() | now.keys()):
      if before.get(key) != now.get(key):
        diffs.append(f"config.{section}.{key} was {before.get(key)!r}, now {now.get(key)!r}")
  return diffs


# --- Reading a finished (or running) run: export, evaluation, registry, gate -------------------


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a workdir's checkpoints say about the run, read without restoring any array."""

  workdir: str
  # Complete steps, ascending.
  steps: list[int]
  latest_step: int
  # The best step by `best_metric` as Orbax tracks it; None when the run kept no best
  # (checkpoint.keep_best=0, or no step carries eval metrics yet).
  best_step: int | None
  # e.g. "eval/accuracy" (the validation split's), and "max" or "min".
  best_metric: str
  best_mode: str
  # The config and data spec saved with the latest step.
  config: ml_collections.ConfigDict
  data_spec: DataSpec


@dataclasses.dataclass(frozen=True)
class StepChoice:
  step: int
  # "best", "latest" or "requested": how the step was chosen, for messages.
  reason: str


@dataclasses.dataclass(frozen=True)
class InferenceModel:
  """A restored model, ready for `model.apply(variables, ...)`."""

  model: nn.Module
  # {"params": ..., **non-parameter collections}: what `model.apply` takes.
  variables: dict
  config: ml_collections.ConfigDict
  data_spec: DataSpec
  step: int
  # The eval metrics saved with this step, if any.
  metrics: dict | None

  @property
  def task(self) -> tasks.Task:
    return tasks.for_spec(self.data_spec)


def read_run_info(workdir: str) -> RunInfo:
  """The steps, latest and best step, config and data spec of the run in `workdir`.

  Raises ConfigError when `workdir` does not exist or holds no complete checkpoint, or its
  checkpoints predate data specs.
  """
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} does not exist; give the directory a run trained into")
  directory = checkpoint_dir(workdir)
  steps = existing_steps(workdir)
  if not steps:
    raise ConfigError(f"{workdir} holds no complete checkpoint (looked in {directory})")
  config, data_spec, _ = read_step_items(workdir, steps[-1])
  best_metric, best_mode = f"eval/{config.eval.best_metric}", config.eval.best_mode
  tracking = _best_tracking(best_metric, best_mode, config.checkpoint.keep_best)
  with _manager(directory, read_only=True, **tracking) as manager:
    best = manager.best_step() if tracking else None
    latest = manager.latest_step()
  return RunInfo(
    workdir=os.path.abspath(workdir),
    steps=steps,
    latest_step=latest,
    best_step=best,
    best_metric=best_metric,
    best_mode=best_mode,
    config=config,
    data_spec=data_spec,
  )


def read_step_items(
  workdir: str, step: int
) -> tuple[ml_collections.ConfigDict, DataSpec, dict | None]:
  """(config, data spec, eval metrics or None) saved with `step`. Checkpoints of older versions
  (an untyped data-spec dict) read as well; ConfigError when the step has no data spec."""
  with _manager(checkpoint_dir(workdir), read_only=True) as manager:
    items = manager.item_metadata(step)
    if "data_spec" not in items:  # JSON items have no metadata, only their presence.
      raise ConfigError(f"step {step} in {workdir} has no data_spec; it predates export support")
    restored = manager.restore(
      step,
      args=ocp.args.Composite(config=ocp.args.JsonRestore(), data_spec=ocp.args.JsonRestore()),
    )
    metrics = manager.metrics(step)
  try:
    data_spec = DataSpec.from_json(restored["data_spec"])
  except ValueError as e:
    raise ConfigError(f"step {step} in {workdir}: unreadable data_spec ({e})") from e
  return ml_collections.ConfigDict(restored["config"]), data_spec, metrics


def resolve_step(workdir: str, step: str | int | None = None) -> StepChoice:
  """The step `step` names: "best" (by the run's eval.best_metric, as Orbax tracked it),
  "latest", a saved step number, or None: the best step when the run kept one, else the latest.

  Raises ConfigError naming the available steps.
  """
  info = read_run_info(workdir)
  if step is None:
    step = "best" if info.best_step is not None else "latest"
  if step == "latest":
    return StepChoice(info.latest_step, "latest")
  if step == "best":
    if info.best_step is None:
      raise ConfigError(
        f"no checkpoint in {workdir} carries eval metrics (checkpoint.keep_best was 0?); "
        f"use --step=latest or one of {info.steps}"
      )
    return StepChoice(info.best_step, "best")
  if not str(step).isdigit() or int(step) not in info.steps:
    raise ConfigError(
      f"--step={step} is not a saved step; choose latest, best or one of {info.steps}"
    )
  return StepChoice(int(step), "requested")


def restore_for_inference(
  workdir: str, step: str | int | None = None, device: jax.Device | None = None
) -> InferenceModel:
  """Restores step `step` (see resolve_step) of the run in `workdir` onto `device` (default:
  this process's first device), whatever mesh wrote it: the parameters (the EMA copy when
  training kept one) and the model's non-parameter state, not the optimizer state.

  Call it from any single process; raises ConfigError for a missing run or step.
  """
  step_number = resolve_step(workdir, step).step
  config, data_spec, metrics = read_step_items(workdir, step_number)
  model = models.get_model(config.model, num_outputs=data_spec.num_classes)
  abstract = _abstract_variables(model, data_spec, device or jax.local_devices()[0])
  with _manager(
    checkpoint_dir(workdir), read_only=True, state_handler=ocp.PyTreeCheckpointHandler()
  ) as manager:
    saved = manager.item_metadata(step_number)["state"]
    params_key = "ema_params" if jax.tree.leaves(saved.get("ema_params")) else "params"
    model_state = {k: v for k, v in abstract.items() if k != "params"}
    target = {params_key: abstract["params"], "model_state": model_state}
    restored = manager.restore(
      step_number,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        )
      ),
    )["state"]
  return InferenceModel(
    model=model,
    variables={"params": restored[params_key], **restored["model_state"]},
    config=config,
    data_spec=data_spec,
    step=step_number,
    metrics=metrics,
  )


def _abstract_variables(model: nn.Module, data_spec: DataSpec, device: jax.Device) -> dict:
  """Shapes of the model's variables, placed on `device`."""
  task = tasks.for_spec(data_spec)
  args, kwargs = task.model_inputs(task.init_batch())
  shapes = jax.eval_shape(
    lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), *args, train=False, **kwargs))
  )
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), dict(shapes)
  )


def _best_tracking(best_metric: str, best_mode: str, keep_best: int) -> dict:
  """The CheckpointManager options that make Orbax track the best step: the same for the writer
  and every reader, so both agree on which step is best. Empty when the run keeps no best."""
  if keep_best <= 0:
    return {}
  return dict(best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode)
