"""`train_and_evaluate(config, workdir)`: the training loop and the stages that set it up.

Stages, in order: build everything the config describes and validate it (nothing is written
yet), check any checkpoint already in the workdir against it, then create or restore the
sharded state and run the loop with periodic logging, eval and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
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
  watchdog,
)
from trainer.data import Dataset, load_dataset
from trainer.data import pipeline as input_pipeline
from trainer.errors import ConfigError
from trainer.metrics import MetricWriter, ProgressLogger, StepMetrics
from trainer.optimizers import Optimizer, create_optimizer
from trainer.preemption import PreemptionWatcher
from trainer.train_state import TrainState, init_train_state


@dataclasses.dataclass(frozen=True)
class TrainResult:
  workdir: str
  # The step the run ended at (== config.train.num_steps unless preempted or stopped early).
  step: int
  train_metrics: dict[str, float]
  # Mean train loss of each logging interval, by the step that closed it.
  logged_losses: dict[int, float]
  # Metrics of the last eval on the validation split (`eval/...`, what picks the best step).
  eval_metrics: dict[str, float]
  # The final state's metrics on the test split (`test/...`); empty when the data has none.
  test_metrics: dict[str, float]
  best_checkpoint_step: int | None
  # Training throughput after the first (compiling) step, eval time excluded.
  steps_per_sec: float
  preempted: bool
  stopped_early: bool
  # An `on_eval` callback asked to stop (e.g. the HPO pruner).
  stopped_by_callback: bool = False
  # What MLflow got (and what it did not).
  tracking: tracking.TrackingSummary | None = None


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
  # (steps.pack_metrics): what the training loop runs.
  loop_step: Callable[[TrainState, dict], tuple[TrainState, jax.Array]]
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
  train_step = steps.make_train_step(
    model,
    task,
    optimizer.tx,
    optimizer.schedule,
    grad_accum_steps=config.optim.grad_accum_steps,
    ema_decay=config.optim.ema_decay,
  )
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
    loop_step=jit_step(steps.pack_metrics(train_step, metric_names)),
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
    loop = _TrainLoop(experiment, checkpointer, writer, start_step, loop_state, on_eval)
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


def evaluate(
  experiment: Experiment, state: TrainState, split: str = "validation"
) -> dict[str, float]:
  """The task's metrics over `split` as `eval/<name>` (validation) or `<split>/<name>`: every
  example exactly once, or the first `config.eval.max_batches` batches when that is set."""
  totals = None
  in_flight = watchdog.InFlightWindow(2)  # Each batch is several executions per device.
  for index, batch in enumerate(
    input_pipeline.eval_batches(
      experiment.dataset.split(split),
      global_batch_size=experiment.config.eval.global_batch_size,
      sharding=experiment.batch_sharding,
      max_batches=experiment.config.eval.max_batches,
    )
  ):
    sums = experiment.eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    in_flight.push(index, totals)
  metrics = experiment.task.metrics(jax.device_get(totals))
  prefix = "eval" if split == "validation" else split
  return {f"{prefix}/{name}": float(value) for name, value in metrics.items()}


class _EarlyStopping:
  """Counts evals without an improvement of the best metric by at least min_delta.

  Its state travels in checkpoints, so patience carries across a resume.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.metric = f"eval/{config.best_metric}"
    self.sign = 1.0 if config.best_mode == "max" else -1.0
    self.patience = config.early_stopping_patience
    self.min_delta = config.early_stopping_min_delta
    self.best: float | None = None
    self.evals_without_improvement = 0

  def should_stop(self, eval_metrics: dict[str, float]) -> bool:
    value = self.sign * eval_metrics[self.metric]
    if self.best is None or value > self.best + self.min_delta:
      self.best, self.evals_without_improvement = value, 0
    else:
      self.evals_without_improvement += 1
    return 0 < self.patience <= self.evals_without_improvement

  def state_dict(self) -> dict:
    return {"best": self.best, "evals_without_improvement": self.evals_without_improvement}

  def load_state_dict(self, state: dict) -> None:
    self.best = state["best"]
    self.evals_without_improvement = state["evals_without_improvement"]


class _TrainLoop:
  """Runs steps until the end, preemption or early stopping, with logging, eval and saves."""

  def __init__(
    self,
    experiment: Experiment,
    checkpointer: checkpointing.Checkpointer | None,
    writer: MetricWriter,
    start_step: int,
    loop_state: dict | None,
    on_eval: Callable[[int, dict[str, float]], bool] | None = None,
  ):
    self.experiment = experiment
    self.on_eval = on_eval
    self.stopped_by_callback = False
    self.config = experiment.config
    self.checkpointer = checkpointer
    self.writer = writer
    self.start_step = start_step
    self.step_metrics = StepMetrics(experiment.metric_names)
    self.progress = ProgressLogger(
      self.config.train.num_steps, start_step, enabled=jax.process_index() == 0
    )
    self.early_stopping = _EarlyStopping(self.config.eval)
    if loop_state:
      self.early_stopping.load_state_dict(loop_state["early_stopping"])
    self.train_metrics: dict[str, float] = {}
    self.logged_losses: dict[int, float] = {}
    self.eval_metrics: dict[str, float] = {}
    self.eval_seconds = 0.0
    self.watchdog = watchdog.StepWatchdog.from_config(self.config.train)
    self.perf_args = dict(
      global_batch=self.config.train.global_batch_size,
      tokens_per_example=experiment.task.tokens_per_example,
      flops_per_step=experiment.flops_per_step,
      num_devices=experiment.mesh.size,
      peak=perf.peak_tflops(
        experiment.mesh.devices.flat[0].device_kind, self.config.perf.peak_tflops
      ),
    )

  def run(self, state: TrainState, data_iterator) -> TrainResult:
    num_steps = self.config.train.num_steps
    # Read once: a ConfigDict lookup costs ~1 us, which adds up against a 1 ms step.
    log_every, eval_every = self.config.train.log_every_steps, self.config.eval.every_steps
    checkpoint_every = self.config.checkpoint.every_steps
    step = self.start_step
    loop_start = time.perf_counter()
    stopped_early = preempted = False
    with PreemptionWatcher() as preemption, self.watchdog as progress:
      while step < num_steps:
        batch = progress.next_batch(data_iterator, step + 1)
        with progress.stage("compile" if step == self.start_step else "step dispatch"):
          state, metrics = self.experiment.loop_step(state, batch)
        step += 1
        progress.dispatched(step, metrics)  # Bounds the steps in flight (trainer/watchdog.py).
        self.step_metrics.append(step, metrics)
        if step == self.start_step + 1:
          # The first step compiled; time the steady state from here.
          jax.block_until_ready(metrics)
          loop_start, self.eval_seconds = time.perf_counter(), 0.0
          self.progress.steps_per_sec(step)

        is_last = step == num_steps
        if step % log_every == 0 or is_last:
          self._log_train(step)
        evaluated = step % eval_every == 0 or is_last
        if evaluated:
          with progress.stage("eval"):
            stopped_early = self._evaluate(step, state)
        with progress.stage("preemption sync"):
          preempted = preemption.should_stop(step)
        stop = is_last or stopped_early or preempted
        if stop or evaluated or step % checkpoint_every == 0:
          with progress.stage("checkpoint"):
            self._maybe_save(step, state, data_iterator, evaluated=evaluated, force=stop)
        if stop:
          break

      progress.drain()
      jax.block_until_ready(state)
      seconds = time.perf_counter() - loop_start - self.eval_seconds
      steps_timed = step - self.start_step - 1
      if self.checkpointer:
        with progress.stage("checkpoint"):
          self.checkpointer.wait_until_finished()
    if not self.eval_metrics:  # The workdir's run had already finished: report its final state.
      self.eval_metrics = evaluate(self.experiment, state)
    test_metrics = {}
    if self.experiment.dataset.test is not None:
      test_metrics = evaluate(self.experiment, state, "test")
      self.writer.write_scalars(step, test_metrics)
    self.writer.flush()
    if preempted:
      logging.warning("Preempted: saved the checkpoint at step %d; rerun to resume.", step)
    return TrainResult(
      workdir="",
      step=step,
      train_metrics=self.train_metrics,
      logged_losses=self.logged_losses,
      eval_metrics=self.eval_metrics,
      test_metrics=test_metrics,
      best_checkpoint_step=self.checkpointer.best_step() if self.checkpointer else None,
      steps_per_sec=steps_timed / seconds if steps_timed > 0 and seconds > 0 else float("nan"),
      preempted=preempted,
      stopped_early=stopped_early and not self.stopped_by_callback,
      stopped_by_callback=self.stopped_by_callback,
    )

  def _log_train(self, step: int) -> None:
    self.train_metrics = self.step_metrics.summarize()
    rate = self.progress.steps_per_sec(step)
    self.logged_losses[step] = self.train_metrics["train/loss"]
    # No rate yet when the first step after a (re)start is a logging step.
    perf_metrics = perf.perf_metrics(rate, **self.perf_args) if math.isfinite(rate) else {}
    self.writer.write_scalars(step, {**self.train_metrics, **perf_metrics})
    self.progress.log(step, self.train_metrics["train/loss"], rate)

  def _evaluate(self, step: int, state: TrainState) -> bool:
    """Evaluates and logs; returns whether early stopping says to stop."""
    self.step_metrics.check_finite()
    eval_start = time.perf_counter()
    self.eval_metrics = evaluate(self.experiment, state)
    self.eval_seconds += time.perf_counter() - eval_start
    self.writer.write_scalars(step, self.eval_metrics)
    logging.info(
      "eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in self.eval_metrics.items())
    )
    stop = self.early_stopping.should_stop(self.eval_metrics)
    if self.on_eval is not None and self.on_eval(step, dict(self.eval_metrics)):
      logging.info("Stopping at step %d: the on_eval callback asked to.", step)
      self.stopped_by_callback = stop = True
    elif stop:
      logging.info(
        "Early stopping at step %d: %s did not improve for %d evals.",
        step,
        self.early_stopping.metric,
        self.early_stopping.evals_without_improvement,
      )
    return stop

  def _maybe_save(self, step: int, state, data_iterator, *, evaluated: bool, force: bool) -> None:
    """Saves on the checkpoint interval, at evals when keeping the best, and when forced."""
    checkpoint = self.config.checkpoint
    due = step % checkpoint.every_steps == 0 or (evaluated and checkpoint.keep_best > 0)
    if not self.checkpointer or not (due or force):
      return
    self.step_metrics.check_finite()  # A non-finite state is never checkpointed.
    self.checkpointer.save(
      state,
      data_iterator,
      self.config,
      metrics=self.eval_metrics if evaluated and checkpoint.keep_best > 0 else None,
      loop_state={"early_stopping": self.early_stopping.state_dict()},
    )
