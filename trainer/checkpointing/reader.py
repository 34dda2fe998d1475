"""Reading a finished (or running) run for what comes after training: export, evaluation, the
registry and the gate. Nothing here writes, and nothing needs the optimizer state."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

import models
from trainer import tasks
from trainer.checkpointing.layout import best_tracking, checkpoint_dir, existing_steps, open_manager
from trainer.data.dataset import DataSpec
from trainer.errors import ConfigError


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
  tracking = best_tracking(best_metric, best_mode, config.checkpoint.keep_best)
  with open_manager(directory, read_only=True, **tracking) as manager:
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
  with open_manager(checkpoint_dir(workdir), read_only=True) as manager:
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
  with open_manager(
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
