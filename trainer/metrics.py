"""Step metrics, TensorBoard summaries and the console progress line.

TensorBoard files are written with tensorboardX, so training never imports TensorFlow.
"""

from __future__ import annotations

import datetime
import math
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from trainer.errors import NonFiniteError

# Metrics that stop the run when they stop being finite.
_GUARDED_METRICS = ("train/loss", "train/grad_norm")


class MetricWriter:
  """TensorBoard writer that is live on process 0 and a no-op everywhere else.

  Construct it on every process; only process 0 touches the filesystem.
  """

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      import tensorboardX  # Deferred: processes other than 0 never need it.

      self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=10)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._writer:
      for name, value in scalars.items():
        self._writer.add_scalar(name, value, step)

  def write_config(self, config: ml_collections.ConfigDict, metric_names: list[str]) -> None:
    """Writes the config as text and as hparams, so runs compare in TensorBoard's HParams tab."""
    if not self._writer:
      return
    from tensorboardX.summary import hparams

    self._writer.add_text("config", "```\n" + str(config) + "\n```", 0)
    experiment, session_start, _ = hparams(
      flatten_config(config), {name: math.nan for name in metric_names}
    )
    self._writer.file_writer.add_summary(experiment)
    self._writer.file_writer.add_summary(session_start)

  def flush(self) -> None:
    if self._writer:
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def flatten_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
  """`{"optim.learning_rate": 0.003, ...}` with values TensorBoard's hparams accept."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten_config(value, prefix=f"{name}."))
    elif isinstance(value, bool | int | float | str):
      flat[name] = value
    else:
      flat[name] = str(value)
  return flat


class StepMetrics:
  """Collects each step's metrics on device and reads them back once per logging interval.

  Reading back every step would stall the dispatch pipeline; instead the arrays queue here and a
  `summarize()` checks them all for non-finite values, naming the first bad step.
  """

  def __init__(self):
    self._pending: list[tuple[int, dict]] = []
    # How many of the pending steps are already on the host and checked.
    self._checked = 0

  def append(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def check_finite(self) -> None:
    """Reads the pending steps back and raises NonFiniteError naming the first bad one."""
    if not self._pending or self._checked == len(self._pending):
      return
    host = jax.device_get([metrics for _, metrics in self._pending])
    self._pending = [(step, m) for (step, _), m in zip(self._pending, host, strict=True)]
    self._checked = len(self._pending)
    for step, metrics in self._pending:
      bad = {k: float(metrics[k]) for k in _GUARDED_METRICS if not np.isfinite(metrics[k])}
      if bad:
        raise NonFiniteError(
          f"non-finite {bad} at step {step}; the run stopped and this state was not "
          "checkpointed. Lower config.optim.learning_rate, enable config.optim.grad_clip_norm, "
          "or check the input data"
        )

  def summarize(self) -> dict[str, float]:
    """Means over the pending steps, then clears them; raises NonFiniteError like check_finite."""
    if not self._pending:
      return {}
    self.check_finite()
    host = [metrics for _, metrics in self._pending]
    self._pending, self._checked = [], 0
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


class ProgressLogger:
  """`step 300/1500 (20%) | loss 0.1234 | 812.4 steps/s | ETA 0:00:01` on the console."""

  def __init__(self, total_steps: int, first_step: int):
    self._total = total_steps
    self._last_step, self._last_time = first_step, time.perf_counter()

  def steps_per_sec(self, step: int) -> float:
    """Rate since the previous call; resets the interval."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate

  def log(self, step: int, loss: float, steps_per_sec: float) -> None:
    eta = datetime.timedelta(seconds=round((self._total - step) / max(steps_per_sec, 1e-9)))
    logging.info(
      "step %d/%d (%d%%) | loss %.4f | %.1f steps/s | ETA %s",
      step,
      self._total,
      100 * step // self._total,
      loss,
      steps_per_sec,
      eta,
    )
