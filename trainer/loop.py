"""The training loop: steps until the end, preemption or early stopping, with logging, eval
and checkpoints (`TrainLoop`), and `evaluate`. train.py builds what it runs on (an Experiment)
and sets it up; nothing here reads the config's validation or touches the workdir's layout.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from trainer import checkpointing, perf, steps, tracking, watchdog
from trainer.data import pipeline as input_pipeline
from trainer.errors import NonFiniteError
from trainer.metrics import MetricWriter, ProgressLogger, StepMetrics
from trainer.preemption import PreemptionWatcher
from trainer.train_state import TrainState

if TYPE_CHECKING:
  from trainer.train import Experiment


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


class EarlyStopping:
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


class TrainLoop:
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
    # The norms are computed on the steps read back only (see run), which include the
    # interval's last: they are logged as their value there.
    self.step_metrics = StepMetrics(
      experiment.metric_names, at_last_step=tuple(f"train/{name}" for name in steps.NORMS)
    )
    self.progress = ProgressLogger(
      self.config.train.num_steps, start_step, enabled=jax.process_index() == 0
    )
    self.early_stopping = EarlyStopping(self.config.eval)
    if loop_state:
      self.early_stopping.load_state_dict(loop_state["early_stopping"])
    self.train_metrics: dict[str, float] = {}
    self.logged_losses: dict[int, float] = {}
    self.eval_metrics: dict[str, float] = {}
    self.eval_seconds = 0.0
    self.watchdog = watchdog.StepWatchdog.from_config(self.config.train)
    # Read once: a ConfigDict lookup costs ~1 us, which adds up against a 1 ms step.
    self._log_every = self.config.train.log_every_steps
    self._eval_every = self.config.eval.every_steps
    self._checkpoint_every = self.config.checkpoint.every_steps
    self._num_steps = self.config.train.num_steps
    self._plain_step = self._diagnostic_step = None
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
    num_steps = self._num_steps
    step = self.start_step
    loop_start = time.perf_counter()
    stopped_early = preempted = False
    with PreemptionWatcher() as preemption, self.watchdog as progress:
      while step < num_steps:
        batch = progress.next_batch(data_iterator, step + 1)
        if step == self.start_step:
          with progress.stage("compile"):
            self._compile_steps(state, batch)
        # What this step's metrics are read back for, decided before it runs: the steps read
        # back run the diagnostic step, which computes the norms.
        is_last = step + 1 == num_steps
        logged = (step + 1) % self._log_every == 0 or is_last
        evaluated = (step + 1) % self._eval_every == 0 or is_last
        checkpoint_due = (step + 1) % self._checkpoint_every == 0
        diagnosed = logged or evaluated or checkpoint_due
        with progress.stage("step dispatch"):
          state, metrics = (self._diagnostic_step if diagnosed else self._plain_step)(state, batch)
        step += 1
        progress.dispatched(step, metrics)  # Bounds the steps in flight (trainer/watchdog.py).
        self.step_metrics.append(step, metrics)
        if step == self.start_step + 1:
          # The steps compiled and the first one ran; time the steady state from here.
          jax.block_until_ready(metrics)
          loop_start, self.eval_seconds = time.perf_counter(), 0.0
          self.progress.steps_per_sec(step)

        if logged:
          self._log_train(step)
        if evaluated:
          with progress.stage("eval"):
            stopped_early = self._evaluate(step, state)
        with progress.stage("preemption sync"):
          preempted = preemption.should_stop(step)
        stop = is_last or stopped_early or preempted
        if stop or evaluated or checkpoint_due:
          with progress.stage("checkpoint"):
            self._maybe_save(
              step, state, data_iterator, evaluated=evaluated, force=stop, diagnosed=diagnosed
            )
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

  def _compile_steps(self, state: TrainState, batch: dict) -> None:
    """Compiles both steps for these shapes before the first one runs: the clock starts after
    the first step, and the watchdog allows compilation only then. Compiled executables cannot
    retrace, so an input of another shape or sharding fails loudly instead of recompiling."""
    self._diagnostic_step = self.experiment.diagnostic_step.lower(state, batch).compile()
    if min(self._log_every, self._eval_every, self._checkpoint_every) == 1:
      self._plain_step = self._diagnostic_step  # Every step is read back.
    else:
      self._plain_step = self.experiment.loop_step.lower(state, batch).compile()

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

  def _maybe_save(
    self, step: int, state, data_iterator, *, evaluated: bool, force: bool, diagnosed: bool
  ) -> None:
    """Saves on the checkpoint interval, at evals when keeping the best, and when forced."""
    checkpoint = self.config.checkpoint
    due = step % checkpoint.every_steps == 0 or (evaluated and checkpoint.keep_best > 0)
    if not self.checkpointer or not (due or force):
      return
    # A non-finite state is never checkpointed: a finite loss and gradient norm at this step
    # mean finite parameters, and a forced save (preemption) on a step without the norms
    # checks the parameters themselves.
    self.step_metrics.check_finite()
    if not diagnosed and not bool(jax.jit(steps.params_finite)(state)):
      raise NonFiniteError(
        f"non-finite parameters at step {step}; the run stopped and this state was not "
        "checkpointed. Lower config.optim.learning_rate or enable config.optim.grad_clip_norm"
      )
    self.checkpointer.save(
      state,
      data_iterator,
      self.config,
      metrics=self.eval_metrics if evaluated and checkpoint.keep_best > 0 else None,
      loop_state={"early_stopping": self.early_stopping.state_dict()},
    )
