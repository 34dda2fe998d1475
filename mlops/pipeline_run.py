"""`run`: train -> register -> validate against `production` -> promote -> record, one pipeline
at a time.

Training runs in a fresh process (`python -m trainer.main`: its own JAX runtime and flags, and
a crash there cannot take the pipeline's record with it); register, validate and promote are
the registry's library functions called in-process. The promotion policy is `direct` (point
`production` at a candidate that passed the gate) or `canary`: the canary controller
(`python -m mlops.rollout canary`, mlops/canary*.py) in its own process (it runs for many
intervals, handles its own signals and rolls back when stopped), against the live server.

Outcomes: `promoted` (exit 0); `rejected`: the candidate failed its gate, stays registered with
its gate record, and `production` does not move (exit 2); `rolled_back`: the canary failed its
checks and was rolled back (exit 2); `failed`: a step raised (exit 1 with the step's error).
Every run, whatever its outcome, is recorded (pipeline_record.py).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

from absl import logging

from mlops import pipeline_data, pipeline_guards, pipeline_record
from mlops.registry_store import RegistryError

PROMOTE_POLICIES = ("direct", "canary")
PRODUCTION = "production"


class PipelineError(Exception):
  """Bad input or a failed step: the CLI prints `error: <message>` and exits 1."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
  config: str
  name: str
  root: str = "runs/pipeline"
  export_base: str | None = None  # Default: the model's own, else runs/models/<name>.
  data: str | None = None
  include_feedback_logs: str | None = None
  feedback: str | None = None
  gate: str | None = None
  promote: str = "direct"
  model_config_file: str | None = None
  server: str | None = None
  config_overrides: tuple[str, ...] = ()
  # --promote=canary: the server's prediction logs and traffic config, and extra flags for
  # `python -m mlops.rollout canary` (e.g. --step_weight=20).
  canary_logs: str | None = None
  traffic_config_file: str | None = None
  canary_flags: tuple[str, ...] = ()
  trigger: dict = dataclasses.field(default_factory=lambda: {"kind": "manual"})

  def lock_path(self) -> str:
    return os.path.join(self.root, "pipeline.lock")


@dataclasses.dataclass(frozen=True)
class PipelineResult:
  outcome: str  # promoted | rejected | failed
  version: int | None
  mlflow_run_id: str
  record_path: str
  message: str


def check_options(options: RunOptions) -> None:
  """Raises PipelineError for input that needs no lock to judge: the promotion policy, the
  config file, the data flags."""
  if options.promote not in PROMOTE_POLICIES:
    raise PipelineError(f"--promote={options.promote}: choose {' or '.join(PROMOTE_POLICIES)}")
  if options.promote == "canary":
    check_canary_options(options)
  config_file = options.config.split(":", 1)[0]
  if not os.path.isfile(config_file):
    raise PipelineError(f"--config={options.config}: {config_file} is not a file")
  if options.gate and not os.path.isfile(options.gate):
    raise PipelineError(f"--gate={options.gate} is not a file; see configs/gates/")
  try:
    pipeline_data.check_inputs(options.data, options.include_feedback_logs, options.feedback)
  except pipeline_data.DataError as e:
    raise PipelineError(str(e)) from e
  check_config(options)


def check_canary_options(options: RunOptions) -> None:
  """Raises PipelineError when --promote=canary lacks what the controller needs (it checks the
  rest itself, before moving anything)."""
  needed = {
    "--canary_logs": options.canary_logs,
    "--traffic_config_file": options.traffic_config_file,
    "--model_config_file": options.model_config_file,
    "--server": options.server,
  }
  missing = [flag for flag, value in needed.items() if not value]
  if missing:
    raise PipelineError(
      f"--promote=canary needs {', '.join(missing)} (the live server's logs, traffic config, "
      "model config and address), or use --promote=direct"
    )
  if not os.path.isdir(options.canary_logs):
    raise PipelineError(f"--canary_logs={options.canary_logs} is not a directory of logs")
  if not os.path.isfile(options.traffic_config_file):
    raise PipelineError(f"--traffic_config_file={options.traffic_config_file} is not a file")


def canary_command(options: RunOptions, version: int, out: str) -> list[str]:
  """The controller's command line for candidate `version` (reports into `out`)."""
  command = [
    sys.executable, "-m", "mlops.rollout", "canary",
    f"--name={options.name}",
    f"--candidate={version}",
    f"--logs={options.canary_logs}",
    f"--traffic_config_file={options.traffic_config_file}",
    f"--model_config_file={options.model_config_file}",
    f"--server={options.server}",
    f"--out={out}",
  ]  # fmt: skip
  if options.feedback:
    command.append(f"--feedback={options.feedback}")
  return command + list(options.canary_flags)


def run_canary(options: RunOptions, version: int, out: str) -> tuple[str, str]:
  """(outcome, message): `promoted` when the controller promoted the candidate (exit 0),
  `rolled_back` when it rolled it back (exit 2). Raises PipelineError with its error line for
  anything else."""
  command = canary_command(options, version, out)
  logging.info("Canary: %s", " ".join(command))
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [line for line in done.stdout.splitlines() if line.strip()]
  summary = lines[-1] if lines else ""
  if done.returncode == 0:
    return "promoted", summary
  if done.returncode == 2:
    return "rolled_back", summary
  errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  why = errors[-1].removeprefix("error: ") if errors else f"exit {done.returncode}"
  raise PipelineError(f"the canary failed: {why}")


def check_config(options: RunOptions) -> None:
  """Loads the config with the run's overrides and validates it as the trainer will (no JAX,
  nothing written), so a misspelled field fails before a pipeline run is recorded. Raises
  ConfigError."""
  from configs import schema
  from trainer import config_loading

  overrides = list(options.config_overrides)
  if options.data is not None:
    overrides = pipeline_data.file_overrides(pipeline_data.split_paths(options.data)) + overrides
  _, overrides = config_loading.split_overrides(["pipeline", *overrides])
  config = config_loading.load_config(options.config)
  config_loading.apply_overrides(config, overrides)
  schema.validate(config)


def run_pipeline(options: RunOptions, client=None) -> PipelineResult:
  """One pipeline run under the pipeline lock of `options.root`. Returns the result for
  promoted and rejected candidates and failed steps (all recorded); raises PipelineError for
  bad input, and GuardError while another pipeline holds the lock (nothing recorded, trained
  or promoted then)."""
  from mlops import registry_store

  check_options(options)
  with pipeline_guards.PipelineLock(options.lock_path()):
    client = client or registry_store.client()
    run_dir = os.path.abspath(
      os.path.join(options.root, options.name, time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    )
    recorder = pipeline_record.PipelineRecorder.start(
      client,
      options.name,
      options.trigger,
      {
        "config": options.config,
        "data": options.data,
        "gate": options.gate,
        "promote": options.promote,
        "feedback_logs": options.include_feedback_logs,
      },
      os.path.join(run_dir, "pipeline.json"),
    )
    try:
      outcome, version, message = _steps(options, client, recorder, run_dir)
    except (PipelineError, RegistryError, pipeline_data.DataError) as e:
      outcome, version, message = "failed", recorder.record.get("version"), str(e)
    except Exception as e:  # Recorded as failed, then raised: a bug must still show its trace.
      recorder.finish("failed", f"{type(e).__name__}: {e}")
      raise
    recorder.finish(outcome, message)
    return PipelineResult(outcome, version, recorder.run_id, recorder.path, message)


def _steps(options, client, recorder, run_dir) -> tuple[str, int | None, str]:
  from mlops import prediction_log, registry_register, validate

  start = time.perf_counter()
  try:
    data = pipeline_data.prepare(
      options.data,
      options.include_feedback_logs,
      options.feedback,
      options.name,
      os.path.join(run_dir, "data"),
    )
  except prediction_log.LogError as e:
    raise PipelineError(str(e)) from e
  workdir = os.path.join(run_dir, "workdir")
  training_run = train(options.config, workdir, [*data.overrides, *options.config_overrides])
  recorder.step(
    "train",
    "ok",
    time.perf_counter() - start,
    workdir=workdir,
    training_run_id=training_run,
    feedback_rows=data.feedback_rows,
  )
  start = time.perf_counter()
  export_base = options.export_base or _export_base(client, options.name)
  registered = registry_register.register(client, workdir, export_base, options.name, "best")
  version = registered.version
  recorder.record["version"] = version
  recorder.link_version(options.name, version)
  recorder.step(
    "register", "ok", time.perf_counter() - start, version=version, export=registered.path
  )
  start = time.perf_counter()
  gate = validate.validate(client, options.name, version, PRODUCTION, options.gate)
  gate_path = client.get_model_version(options.name, str(version)).tags.get("gate.record")
  passed = gate["verdict"] == "pass"
  recorder.step(
    "validate",
    "ok" if passed else "rejected",
    time.perf_counter() - start,
    gate_verdict=gate["verdict"],
    gate_baseline=gate["baseline"],
    gate_record=gate_path,
    gate_failed=",".join(gate["failed"]) or None,
  )
  if not passed:
    recorder.step("promote", "skipped", 0.0)
    return (
      "rejected",
      version,
      (
        f"{options.name} version {version} failed its gate ({', '.join(gate['failed'])}); "
        f"{PRODUCTION} stays at {gate['baseline'] or 'no version'}; record: {gate_path}"
      ),
    )
  return _promote(options, client, recorder, version, run_dir)


def _promote(options, client, recorder, version: int, run_dir: str) -> tuple[str, int, str]:
  """The promote step, by policy: the registry's audited move of `production`, or the canary."""
  from mlops import registry_promote

  start = time.perf_counter()
  if options.promote == "canary":
    outcome, summary = run_canary(options, version, os.path.join(run_dir, "canary"))
    recorder.step(
      "promote",
      "ok" if outcome == "promoted" else outcome,
      time.perf_counter() - start,
      policy="canary",
      canary=summary,
      canary_report=os.path.join(run_dir, "canary", "canary.md"),
    )
    return outcome, version, summary
  begin = registry_promote.promote(
    client,
    options.name,
    version,
    PRODUCTION,
    model_config_file=options.model_config_file,
    server=options.server,
    reason=f"pipeline run {recorder.run_id} ({options.trigger.get('kind', 'manual')})",
  )
  recorder.step(
    "promote",
    "ok",
    time.perf_counter() - start,
    promoted_from=begin["from"],
    promoted_to=version,
    policy=options.promote,
  )
  return "promoted", version, f"{options.name}@{PRODUCTION}: {begin['from'] or 'none'} -> {version}"


def _export_base(client, name: str) -> str:
  """The registered model's export base, or runs/models/<name> for a new model."""
  from mlops import registry_promote

  try:
    return registry_promote.export_base_of(client, name)
  except RegistryError:
    return os.path.abspath(os.path.join("runs", "models", name))


def train(config: str, workdir: str, overrides: list[str]) -> str | None:
  """Runs `python -m trainer.main` in a fresh process; returns the training run's MLflow run
  id (None when untracked). Raises PipelineError with the trainer's error line on failure."""
  from mlops import registry_register

  command = [sys.executable, "-m", "trainer.main", f"--config={config}", f"--workdir={workdir}"]
  logging.info("Training: %s", " ".join(command + overrides))
  done = subprocess.run(command + overrides, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    why = errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else "no output")
    raise PipelineError(f"training failed (exit {done.returncode}): {why}")
  return registry_register.run_info(workdir).get("run_id")
