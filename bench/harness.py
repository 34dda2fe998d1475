"""What the benchmarks share: running the trainer and jit loops, timing them, reporting the results.

Imported by the scripts in bench/ (`python bench/<name>.py` puts this directory on sys.path).
"""

from __future__ import annotations

import datetime
import logging as py_logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata

import jax
import ml_collections
from absl import logging

from trainer import train

# Orbax warns at every save without metrics when best_fn is set.
_ORBAX_NO_METRICS_WARNING = "Requested `tracked_metric`; did not provide metrics."


def run_trainer(config: ml_collections.ConfigDict, tmp_root: str) -> train.TrainResult:
  """`train_and_evaluate` in a fresh workdir (a reused one would resume), removed afterwards."""
  workdir = tempfile.mkdtemp(prefix="trainer_", dir=tmp_root)
  try:
    result = train.train_and_evaluate(config, workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if result.step != config.train.num_steps:
    raise RuntimeError(f"trainer stopped at step {result.step} of {config.train.num_steps}")
  return result


def time_loop(step: Callable, carry, batches: Sequence, num_steps: int) -> float:
  """Steps/sec of `step(carry, jax.device_put(batch))` for `num_steps - 1` steps after a warmup.

  `batches` are host (numpy) batches, cycled; the loop ends with `block_until_ready`.
  """
  carry, out = step(carry, jax.device_put(batches[0]))
  jax.block_until_ready((carry, out))
  start = time.perf_counter()
  for i in range(1, num_steps):
    carry, out = step(carry, jax.device_put(batches[i % len(batches)]))
  jax.block_until_ready((carry, out))
  return (num_steps - 1) / (time.perf_counter() - start)


def quiet_logs() -> None:
  """Warnings only: Orbax and grain log every save and pipeline detail at INFO."""
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_DropMessage(_ORBAX_NO_METRICS_WARNING))


def require_one_cpu_device() -> None:
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit(
      "XLA_FLAGS forces several host devices; unset it: this benchmark runs on one CPU device"
    )


def machine_description(devices: bool = True) -> list[str]:
  """Date, CPUs, OS, library versions and (unless `devices` is False) this process's devices."""
  versions = ", ".join(
    f"{name} {metadata.version(name)}"
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
  )
  lines = [
    f"date: {datetime.date.today().isoformat()}",
    f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
    f"{platform.machine()}, {platform.platform()}",
    f"python {platform.python_version()}; {versions}",
  ]
  if devices:
    lines.append(f"JAX devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  return lines


def load_average() -> str:
  """The 1-minute load average: above the core count, other work competed for the CPUs."""
  return f"{os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs)"


def command_line() -> str:
  return " ".join([os.path.relpath(sys.executable), *sys.argv])


def print_run_header(load_before: str, devices: bool = True) -> None:
  """What a result depends on: the command, the machine, and how loaded it was."""
  print("command: " + command_line())
  print("\n".join(machine_description(devices=devices)))
  print(f"load average: {load_before} at the start, {load_average()} at the end")


def table(header: list[str], rows: list[list[str]]) -> str:
  """A markdown table, so the output pastes into docs/benchmarks.md as is."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


class _DropMessage(py_logging.Filter):
  def __init__(self, message: str):
    super().__init__()
    self._message = message

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.getMessage() != self._message
