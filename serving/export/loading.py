"""Loads a trained checkpoint for inference onto whatever devices this process has.

A checkpoint written by any mesh (8 devices, 2 processes, ...) restores here onto one device:
only the parameters (the EMA copy when training kept one) and the model's non-parameter state
are read, not the optimizer state, and nothing but the checkpoint is needed (the data spec
travels with it).
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

import models
from trainer import checkpointing
from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class InferenceModel:
  model: nn.Module
  # {"params": ..., **non-parameter collections}: what `model.apply` takes.
  variables: dict
  config: ml_collections.ConfigDict
  data_spec: dict
  step: int
  # The eval metrics saved with this step, if any.
  metrics: dict | None


def resolve_step(workdir: str, step: str) -> int:
  """`latest`, `best` (by the run's eval.best_metric) or a step number that exists in `workdir`.

  Raises ConfigError naming the available steps.
  """
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} does not exist; give the directory a run trained into")
  steps = checkpointing.existing_steps(workdir)
  if not steps:
    raise ConfigError(
      f"{workdir} holds no complete checkpoint (looked in {checkpointing.checkpoint_dir(workdir)})"
    )
  if step == "latest":
    return steps[-1]
  if step == "best":
    return _best_step(workdir, steps)
  if not step.isdigit() or int(step) not in steps:
    raise ConfigError(f"--step={step} is not a saved step; choose latest, best or one of {steps}")
  return int(step)


def _best_step(workdir: str, steps: list[int]) -> int:
  config = _read_json(workdir, steps[-1], "config")
  metric = f"eval/{config['eval']['best_metric']}"
  sign = 1.0 if config["eval"]["best_mode"] == "max" else -1.0
  scored = []
  for step in steps:
    metrics = _read_json(workdir, step, "metrics")
    if metrics and metric in metrics:
      scored.append((sign * metrics[metric], step))
  if not scored:
    raise ConfigError(
      f"no checkpoint in {workdir} carries eval metrics (checkpoint.keep_best was 0?); "
      f"use --step=latest or one of {steps}"
    )
  return max(scored)[1]


def _read_json(workdir: str, step: int, item: str) -> dict | None:
  """A JSON item of a checkpoint step (Orbax stores it as the one data file of its directory)."""
  directory = epath.Path(checkpointing.checkpoint_dir(workdir)) / str(step) / item
  if not directory.exists():
    return None
  files = [p for p in directory.iterdir() if p.is_file() and p.name != "commit_success.txt"]
  return json.loads(files[0].read_text()) if files else None


def load(workdir: str, step: str = "latest") -> InferenceModel:
  """Restores step `step` of the run in `workdir` onto this process's first device."""
  step_number = resolve_step(workdir, step)
  config = ml_collections.ConfigDict(_read_json(workdir, step_number, "config"))
  data_spec = _read_json(workdir, step_number, "data_spec")
  if not data_spec:
    raise ConfigError(
      f"step {step_number} in {workdir} has no data_spec; it predates export support"
    )
  model = models.get_model(config.model, num_outputs=data_spec["num_classes"])
  abstract = _abstract_variables(model, data_spec)
  directory = checkpointing.checkpoint_dir(workdir)
  with ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    item_handlers={
      "state": ocp.PyTreeCheckpointHandler(),
      **{name: ocp.JsonCheckpointHandler() for name in ("config", "data_spec", "loop_state")},
    },
  ) as manager:
    saved = manager.item_metadata(step_number)["state"]
    params_key = "ema_params" if _has_arrays(saved.get("ema_params")) else "params"
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
  variables = {"params": restored[params_key], **restored["model_state"]}
  return InferenceModel(
    model=model,
    variables=variables,
    config=config,
    data_spec=data_spec,
    step=step_number,
    metrics=_read_json(workdir, step_number, "metrics"),
  )


def _has_arrays(tree) -> bool:
  return bool(jax.tree.leaves(tree))


def _abstract_variables(model: nn.Module, data_spec: dict) -> dict:
  """Shapes of the model's variables, placed on this process's first device."""
  from trainer import tasks
  from trainer.data import sources as data_sources

  dataset = data_sources.Dataset(
    train=None,
    eval=None,
    num_classes=data_spec["num_classes"],
    input_shape=tuple(data_spec["input_shape"]),
    mean=data_spec["mean"],
    std=data_spec["std"],
    fingerprint="",
    kind=data_spec["kind"],
  )
  task = tasks.for_dataset(dataset)
  args, kwargs = task.model_inputs(task.init_batch())
  shapes = jax.eval_shape(
    lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), *args, train=False, **kwargs))
  )
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), dict(shapes)
  )
