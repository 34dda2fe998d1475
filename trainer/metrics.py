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

  Construct it on every process; only process 0 touches the filesystem. Every scalar also goes
  to `tracker.log_metrics(step, scalars)` when a tracker is given (trainer/tracking.py), so MLflow
  gets the same metrics at the same steps.
  """

  def __init__(self, logdir: str, tracker=None):
    self._tracker = tracker
    self._writer = None
    if jax.process_index() == 0:
      import tensorboardX  # Deferred: processes other than 0 never need it.

      self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=10)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._writer:
      for name, value in scalars.items():
        self._writer.add_scalar(name, value, step)
    if self._tracker:
      self._tracker.log_metrics(step, scalars)

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
  """Collects each step's packed metrics (a vector in the order of `names`: steps.pack_metrics)
  on device and reads them back once per logging interval.

  Reading back every step would stall the dispatch pipeline; instead the vectors queue here, are
  read back together, and are checked for non-finite values, naming the first bad step.
  """

  def __init__(self, names: tuple[str, ...], at_last_step: tuple[str, ...] = ()):
    self._names = names
    self._guarded = [names.index(name) for name in _GUARDED_METRICS]
    # Metrics summarized by their value at the interval's last step (computed only there).
    self._at_last_step = at_last_step
    self._steps: list[int] = []
    self._on_device: list[jax.Array] = []
    # Steps already read back and checked: a (steps, metrics) array.
    self._on_host = np.zeros((0, len(names)), np.float32)

  def append(self, step: int, metrics: jax.Array) -> None:
    self._steps.append(step)
    self._on_device.append(metrics)

  def check_finite(self) -> None:
    """Reads the pending steps back and raises NonFiniteError naming the first bad one."""
    if not self._on_device:
      return
    # np.asarray per vector: ~4 us each on a CPU, against ~25 us through jax.device_get's
    # tree handling, and no stack compiled per interval length.
    new = np.stack([np.asarray(metrics) for metrics in self._on_device])
    new_steps = np.asarray(self._steps[len(self._on_host) :])
    self._on_device = []
    self._on_host = np.concatenate([self._on_host, new])
    bad = ~np.all(np.isfinite(new[:, self._guarded]), axis=1)
    if bad.any():
      first = int(np.argmax(bad))
      values = {
        name: float(new[first, i]) for name, i in zip(_GUARDED_METRICS, self._guarded, strict=True)
      }
      raise NonFiniteError(
        f"non-finite {values} at step {new_steps[first]}; the run stopped and this state was "
        "not checkpointed. Lower config.optim.learning_rate, enable config.optim.grad_clip_norm, "
        "or check the input data"
      )

  def summarize(self) -> dict[str, float]:
    """Means over the pending steps (`at_last_step` metrics: the last step's value), then clears
    them; raises NonFiniteError like check_finite."""
    self.check_finite()
    if not len(self._on_host):
      return {}
    means = {
      name: float(column[-1] if name in self._at_last_step else np.mean(column))
      for name, column in zip(self._names, self._on_host.T, strict=True)
    }
    self._steps, self._on_host = [], self._on_host[:0]
    return means


class ProgressLogger:
  """`step 300/1500 (20%) | loss 0.1234 | 812.4 steps/s | ETA 0:00:01` on the console.

  Every process keeps the rate (it is also a metric); only the one built with `enabled` (process
  0) prints, so a multi-process run shows one progress line per logging step.
  """

  def __init__(self, total_steps: int, first_step: int, enabled: bool = True):
    self._total = total_steps
    self._enabled = enabled
    self._last_step, self._last_time = first_step, time.perf_counter()

  def steps_per_sec(self, step: int) -> float:
    """Rate since the previous call, which it resets; NaN when no step ran since then (the
    first step after a (re)start that is also a logging step: its rate is not known yet)."""
    now = time.perf_counter()
    steps = step - self._last_step
    rate = steps / max(now - self._last_time, 1e-9) if steps > 0 else math.nan
    self._last_step, self._last_time = step, now
    return rate

  def log(self, step: int, loss: float, steps_per_sec: float) -> None:
    if not self._enabled:
      return
    if math.isfinite(steps_per_sec) and steps_per_sec > 0:
      rate = f"{steps_per_sec:.1f} steps/s"
      eta = str(datetime.timedelta(seconds=round((self._total - step) / steps_per_sec)))
    else:
      rate, eta = "rate pending", "unknown"
    logging.info(
      "step %d/%d (%d%%) | loss %.4f | %s | ETA %s",
      step,
      self._total,
      100 * step // self._total,
      loss,
      rate,
      eta,
    )
