"""`train_and_evaluate(config, workdir)`: the stages that set up the training loop.

Stages, in order: build everything the config describes and validate it (nothing is written
yet), check any checkpoint already in the workdir against it, then create or restore the
sharded state and run the loop (trainer/loop.py) with periodic logging, eval and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh, NamedSharding

import models
from configs import schema
from trainer import (
  checkpointing,
  manifest,
  partitioning,
  perf,
  steps,
  tasks,
  tracking,
)
from trainer.data import Dataset, load_dataset
from trainer.data import pipeline as input_pipeline
from trainer.errors import ConfigError
from trainer.loop import EarlyStopping, TrainLoop, TrainResult, evaluate  # noqa: F401 (API)
from trainer.metrics import MetricWriter
from trainer.optimizers import Optimizer, create_optimizer
from trainer.train_state import TrainState, init_train_state


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything the config describes, built and validated before anything is written."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  dataset: Dataset
  model: nn.Module
  task: tasks.Task
  optimizer: Optimizer
  # ShapeDtypeStructs carrying their target shardings.
  abstract_state: TrainState
  state_shardings: TrainState
  batch_sharding: NamedSharding
  init_state: Callable[[jax.Array], TrainState]
  # (state, batch) -> (state, metrics by name): one step, for callers outside the loop.
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  # The same step with its metrics packed as one vector in the order of `metric_names`
  # (steps.pack_metrics), as the training loop runs it: `loop_step` on most steps, reporting
  # steps.NORMS as 0; `diagnostic_step`, which computes them, where the loop reads metrics back.
  loop_step: Callable[[TrainState, dict], tuple[TrainState, jax.Array]]
  diagnostic_step: Callable[[TrainState, dict], tuple[TrainState, jax.Array]]
  metric_names: tuple[str, ...]
  eval_step: Callable[[TrainState, dict], dict]
  # Analytic training FLOPs per step (language models), for perf/mfu; None when unknown.
  flops_per_step: float | None

  def train_iterator(self, **overrides):
    """The training batches as the config describes them (sharded onto the mesh, from the
    start of the stream); `overrides` replace train_iterator arguments, e.g. worker_threads."""
    config = self.config
    kwargs = {
      "global_batch_size": config.train.global_batch_size,
      "seed": config.seed,
      "shuffle": config.data.shuffle,
      "worker_threads": config.data.worker_threads,
      "prefetch_batches": config.data.prefetch_batches,
      "sharding": self.batch_sharding,
      "device_resident_bytes": config.data.device_resident_mb * 2**20,
    }
    return input_pipeline.train_iterator(self.dataset, **{**kwargs, **overrides})


def build_experiment(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Experiment:
  """Validates `config` and builds its mesh, data, model and jitted steps; writes nothing.

  Raises ConfigError naming the offending field for any unusable setting.
  """
  schema.validate(config)
  mesh = partitioning.create_mesh(config.mesh, devices)
  data_parallel = partitioning.data_parallel_size(mesh)
  input_pipeline.per_process_batch_size(
    config.train.global_batch_size, data_parallel, "config.train.global_batch_size"
  )
  input_pipeline.per_process_batch_size(
    config.eval.global_batch_size, data_parallel, "config.eval.global_batch_size"
  )
  _validate_loop_config(config, data_parallel)
  dataset = load_dataset(config.data)
  task = tasks.for_spec(dataset.spec)
  _validate_eval_metric(config.eval, task)
  try:
    model = models.get_model(config.model, num_outputs=dataset.spec.num_classes)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  optimizer = create_optimizer(config.optim, config.train.num_steps)

  init = functools.partial(
    init_train_state,
    model,
    optimizer.tx,
    init_batch=task.init_batch(),
    model_inputs=task.model_inputs,
    use_ema=config.optim.ema_decay > 0,
  )
  rng = jax.random.PRNGKey(config.seed)
  boxed_abstract = jax.eval_shape(lambda key: init(rng=key), rng)
  state_shardings = partitioning.logical_to_shardings(
    boxed_abstract, mesh, config.mesh.logical_axis_rules
  )
  abstract_state = jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
    nn.meta.unbox(boxed_abstract),
    state_shardings,
  )
  replicated = partitioning.replicated(mesh)
  batch_sharding = partitioning.batch_sharding(mesh)
  make_train_step = functools.partial(
    steps.make_train_step,
    model,
    task,
    optimizer.tx,
    optimizer.schedule,
    grad_accum_steps=config.optim.grad_accum_steps,
    ema_decay=config.optim.ema_decay,
  )
  train_step = make_train_step()
  eval_step = steps.make_eval_step(model, task)
  metric_names = steps.train_metric_names(task)
  jit_step = functools.partial(
    jax.jit,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )
  return Experiment(
    config=config,
    mesh=mesh,
    dataset=dataset,
    model=model,
    task=task,
    optimizer=optimizer,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    batch_sharding=batch_sharding,
    init_state=jax.jit(
      lambda key: nn.meta.unbox(init(rng=key)),
      in_shardings=replicated,
      out_shardings=state_shardings,
    ),
    train_step=jit_step(train_step),
    loop_step=jit_step(steps.pack_metrics(make_train_step(norms=False), metric_names)),
    diagnostic_step=jit_step(steps.pack_metrics(train_step, metric_names)),
    metric_names=metric_names,
    eval_step=jax.jit(
      eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated
    ),
    flops_per_step=perf.model_flops_per_step(
      model, dataset.spec.input_shape, config.train.global_batch_size
    ),
  )


def _validate_loop_config(config: ml_collections.ConfigDict, data_parallel: int) -> None:
  """What configs/schema.py cannot check alone: grad_accum_steps against the device batch."""
  local_rows = config.train.global_batch_size // data_parallel
  if local_rows % config.optim.grad_accum_steps:
    raise ConfigError(
      f"config.optim.grad_accum_steps={config.optim.grad_accum_steps} must divide the "
      f"{local_rows} rows each data-parallel device gets per step (global batch "
      f"{config.train.global_batch_size} / data-parallel size {data_parallel})"
    )


def _validate_eval_metric(config: ml_collections.ConfigDict, task: tasks.Task) -> None:
  if config.best_metric not in task.metric_names:
    raise ConfigError(
      f"config.eval.best_metric={config.best_metric!r} is not an eval metric of this task; "
      f"choose one of {task.metric_names}"
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  devices: Sequence[jax.Device] | None = None,
  on_eval: Callable[[int, dict[str, float]], bool] | None = None,
) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Every process must call this. Raises ConfigError (with nothing written) for an unusable
  config or a workdir holding an incompatible checkpoint, and NonFiniteError when the loss or
  gradient norm stops being finite. The run is tracked in MLflow (trainer/tracking.py) and ends
  there FINISHED, KILLED (preempted) or FAILED (an exception).

  `on_eval(step, eval_metrics)`, when given, is called after every eval on every process and
  returns True to stop there: the state is checkpointed and the result has
  `stopped_by_callback`. It must answer the same on every process (HPO pruning uses it).
  """
  experiment = build_experiment(config, devices)
  saved_steps = checkpointing.existing_steps(workdir)
  if saved_steps:
    checkpointing.check_compatible(workdir, saved_steps[-1], experiment.abstract_state, config)

  os.makedirs(workdir, exist_ok=True)
  checkpointer = (
    checkpointing.Checkpointer(
      workdir,
      config.checkpoint,
      best_metric=f"eval/{config.eval.best_metric}",
      best_mode=config.eval.best_mode,
      data_spec=experiment.dataset.spec,
    )
    if config.checkpoint.enabled
    else None
  )
  tracker = tracking.RunTracker(config, workdir)
  writer = MetricWriter(os.path.join(workdir, "tensorboard"), tracker)
  status, reason = "FAILED", "error"
  try:
    state, data_iterator, loop_state = _initial_state(experiment, checkpointer)
    start_step = int(jax.device_get(state.step))
    if jax.process_index() == 0:
      run_manifest = manifest.build_manifest(
        config, experiment.mesh, experiment.dataset.fingerprint, start_step
      )
      manifest.write_manifest(workdir, run_manifest)
      tracking.log_run_start(tracker, config, run_manifest, workdir)
    writer.write_config(config, [f"eval/{name}" for name in experiment.task.metric_names])
    loop = TrainLoop(experiment, checkpointer, writer, start_step, loop_state, on_eval)
    result = loop.run(state, data_iterator)
    status = "KILLED" if result.preempted else "FINISHED"
    reason = (
      "preempted"
      if result.preempted
      else "stopped_by_callback"
      if result.stopped_by_callback
      else "stopped_early"
      if result.stopped_early
      else "completed"
    )
  except BaseException as e:
    reason = f"{type(e).__name__}: {e}"
    raise
  finally:
    if checkpointer:
      checkpointer.close()  # Waits for in-flight saves.
    writer.close()
    if status != "FAILED" and config.tracking.report and jax.process_index() == 0:
      tracking.write_and_log_report(tracker, workdir)
    summary = tracker.end(status, reason)
  return dataclasses.replace(result, workdir=os.path.abspath(workdir), tracking=summary)


def _initial_state(
  experiment: Experiment, checkpointer: checkpointing.Checkpointer | None
) -> tuple[TrainState, object, dict | None]:
  """The state to start from: restored from the latest checkpoint, or freshly initialized."""
  config = experiment.config
  data_iterator = experiment.train_iterator()
  latest = checkpointer.latest_step() if checkpointer else None
  if latest is not None:
    logging.info("Resuming from the checkpoint at step %d.", latest)
    state, loop_state = checkpointer.restore(latest, experiment.abstract_state, data_iterator)
  else:
    state, loop_state = experiment.init_state(jax.random.PRNGKey(config.seed)), None
  partitioning.check_sharding(state, experiment.state_shardings)
  return state, data_iterator, loop_state
