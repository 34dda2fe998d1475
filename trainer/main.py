r"""Trains a model from a config file.

  python -m trainer.main --config=configs/digits_cnn.py --workdir=/tmp/run1 \
      --config.optim.learning_rate=1e-3 --config.train.num_steps=600

Bad input (a config file that does not load, a misspelled or out-of-range field, an unusable
workdir or data file) ends the run with one line `error: ...` on stderr and exit code 1, before
anything is written. Heavy imports (JAX, the models) wait until the command line is known good,
so such errors take a fraction of a second.
"""

import signal

if __name__ == "__main__":
  # A SIGTERM (preemption) may come at any moment, also during the seconds of imports and setup
  # before the training loop installs its handler: block it until then. A blocked signal stays
  # pending, and the loop's PreemptionWatcher receives it when it unblocks SIGTERM, so the run
  # stops after its first step with a checkpoint and exits 0.
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

import dataclasses
import sys
from collections.abc import Sequence

import ml_collections
from absl import app, flags, logging

from configs import schema
from trainer import config_loading
from trainer.errors import ConfigError, NonFiniteError
from trainer.workdir import check_workdir

_CONFIG = flags.DEFINE_string(
  "config",
  None,
  "Path to a config file, optionally with `:arg` (e.g. configs/digits_cnn.py:smoke); override "
  "its fields with --config.<group>.<field>=VALUE.",
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


@dataclasses.dataclass(frozen=True)
class Command:
  """A command line that passed every check that needs no devices."""

  config: ml_collections.ConfigDict
  workdir: str


def parse_command_line(argv: Sequence[str]) -> Command:
  """Parses `argv` (program name first): flags, the config file and its overrides, the workdir.

  Loads the config, applies the overrides, validates every field against configs/schema.py
  and checks the workdir, writing nothing. Raises ConfigError with one line for any problem.
  """
  rest, overrides = config_loading.split_overrides(argv)
  flags.FLAGS.unparse_flags()
  try:
    positional = flags.FLAGS(rest)
  except flags.Error as e:
    raise ConfigError(f"{e}; see --helpfull") from e
  if flags.FLAGS["verbosity"].using_default_value:
    flags.FLAGS.verbosity = 0  # INFO, as absl.app.run sets it after its own parse.
  if len(positional) > 1:
    raise ConfigError(f"unexpected arguments {positional[1:]}; every argument is a --flag")
  if _CONFIG.value is None:
    raise ConfigError(
      "--config is missing; pass a config file, e.g. --config=configs/digits_cnn.py"
    )
  config = config_loading.load_config(_CONFIG.value)
  config_loading.apply_overrides(config, overrides)
  schema.validate(config)
  return Command(config=config, workdir=check_workdir(_WORKDIR.value))


def run(argv: Sequence[str]) -> int:
  """The whole command: parse, validate, train. Returns the exit code.

  A user error prints one `error: ...` line on stderr and returns 1; anything else that goes
  wrong is a bug and raises.
  """
  try:
    command = parse_command_line(argv)
  except ConfigError as e:
    return _report_error(e)
  # Deferred: importing JAX and the models takes seconds, which a bad command line never waits.
  import jax

  from trainer import distributed, log_filter, train

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
    logging.info(
      "JAX process %d/%d, %d local / %d global devices (%s)",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].device_kind,
    )
    result = train.train_and_evaluate(command.config, command.workdir)
  except (ConfigError, NonFiniteError) as e:
    return _report_error(e)
  except Exception as e:  # Re-raised below when this is the only process.
    if jax.process_count() > 1:
      distributed.exit_failed_process(e)
    raise
  if jax.process_index() == 0:
    _print_summary(result)
  return 0


def _report_error(error: Exception) -> int:
  # One line, printed once: no absl E-line repeating it.
  message = " ".join(str(error).split())
  print(f"error: {message}", file=sys.stderr, flush=True)
  return 1


def _print_summary(result) -> None:
  status = "preempted" if result.preempted else "stopped early" if result.stopped_early else "done"
  lines = [f"training {status} at step {result.step}"]
  # The test split when the data has one (never used to pick a checkpoint), else validation.
  held_out = result.test_metrics or {
    name.replace("eval/", "validation/"): value for name, value in result.eval_metrics.items()
  }
  lines += [f"{name.replace('/', ' ')}: {value:.4f}" for name, value in sorted(held_out.items())]
  lines += [
    f"best checkpoint step: {result.best_checkpoint_step}",
    f"workdir: {result.workdir}",
    f"tensorboard --logdir {result.workdir}/tensorboard",
  ]
  if result.tracking:
    lines.append(result.tracking.describe())
  print("\n".join(lines), flush=True)


def _parse_absl_flags(argv: list[str]) -> list[str]:
  """app.run's flag parser: absl's own flags (--help, --verbosity) without the config overrides.

  Returns the whole argv for `run`, which parses it again with the config and reports errors
  in one line (absl's parser would print two and the usage).
  """
  rest, _ = config_loading.split_overrides(argv)
  try:
    flags.FLAGS(rest)
  except flags.Error as e:
    sys.exit(_report_error(ConfigError(f"{e}; see --helpfull")))
  return list(argv)


def main(argv: list[str]) -> None:
  sys.exit(run(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_absl_flags)
