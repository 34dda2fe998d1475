r"""Trains a model from a config file.

  python -m trainer.main --config=configs/digits_cnn.py --workdir=/tmp/run1 \
      --config.optim.learning_rate=3e-3 --config.mesh.data=-1
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from trainer import distributed, log_filter, train
from trainer.errors import ConfigError, NonFiniteError

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file, optionally with `:arg`.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the manifest.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "true", "false"],
  "Start jax.distributed: auto = when a cluster (SLURM, Cloud TPU) or coordinator flags say so.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0's coordinator, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout_seconds",
  100,
  "Processes fail (instead of hanging) when a peer is silent this long.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  log_filter.quiet_library_info_logs()
  try:
    distributed.initialize(
      distributed.DistributedOptions(
        enabled={"auto": None, "true": True, "false": False}[_DISTRIBUTED.value],
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
      )
    )
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  logging.info(
    "JAX process %d/%d, %d local / %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  try:
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, NonFiniteError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    _print_summary(result)


def _print_summary(result: train.TrainResult) -> None:
  status = "preempted" if result.preempted else "stopped early" if result.stopped_early else "done"
  lines = [f"training {status} at step {result.step}"]
  lines += [
    f"test {name.removeprefix('eval/')}: {value:.4f}"
    for name, value in sorted(result.eval_metrics.items())
  ]
  lines += [
    f"best checkpoint step: {result.best_checkpoint_step}",
    f"workdir: {result.workdir}",
    f"tensorboard --logdir {result.workdir}/tensorboard",
  ]
  if result.tracking:
    lines.append(result.tracking.describe())
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  app.run(main)
