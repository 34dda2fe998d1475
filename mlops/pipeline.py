r"""Continuous training: the pipeline (train -> register -> validate -> promote -> record) and
the watcher that starts it on a monitor alert, behind guards.

  python -m mlops.pipeline run --config=configs/digits_cnn.py --name=digits \
      [--data=DIR [--include_feedback_logs=LOGS --feedback=FILE]] [--gate=configs/gates/x.py] \
      [--promote=direct | --promote=canary --canary_logs=LOGS --traffic_config_file=FILE \
       --server=HOST:PORT [--canary_flag=--step_weight=20 ...]] [--model_config_file=runs/models/models.config] [--server=HOST:PORT] \
      [--root=runs/pipeline] [--config.train.num_steps=...]
  python -m mlops.pipeline watch --config=configs/digits_cnn.py --name=digits --logs=LOGS \
      --every_s=300 [--feedback=FILE] [--persistence_windows=2] [--cooldown_s=3600] \
      [--min_new_labels=100] [--max_retrains_per_day=3] [--max_iterations=N] [run's flags]

`run` exits 0 when the candidate was promoted, 2 when it failed its gate (rejected: registered
with its gate record, `production` unchanged) or its canary rolled back (--promote=canary), 1 for
bad input or a failed step (one `error:` line). Every run is an MLflow run in the experiment `pipeline/<name>` (mlops/pipeline_record.py).
`watch` guards (mlops/pipeline_guards.py): an alert persisting K windows, a cooldown, new
labelled rows, a daily cap, one pipeline at a time, no retrain on the same data after a
rejected candidate.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from mlops import pipeline_guards, pipeline_run, pipeline_watch
from serving.server.log_format import RPCS


def parser() -> argparse.ArgumentParser:
  # argparse, not absl flags: the registry and the exporter define absl flags of the same names.
  root = argparse.ArgumentParser(
    prog="python -m mlops.pipeline", description=__doc__.split("\n")[0]
  )
  commands = root.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="train, register, validate, promote, record")
  watch = commands.add_parser("watch", help="monitor every interval; retrain on guarded alerts")
  for sub in (run, watch):
    sub.add_argument("--config", required=True, help="Config file[:arg] to train.")
    sub.add_argument("--name", required=True, help="Registered model name.")
    sub.add_argument("--root", default="runs/pipeline", help="Pipeline runs, lock and state.")
    sub.add_argument("--export_base", help="Version directories (default: the model's own).")
    sub.add_argument("--data", help="Directory with train.npz, validation.npz[, test.npz].")
    sub.add_argument("--gate", help="Gate config (default: configs/gates/<kind>.py).")
    sub.add_argument(
      "--promote",
      default="direct",
      help="direct: production moves when the gate passes; canary: python -m mlops.rollout canary.",
    )
    sub.add_argument("--canary_logs", help="--promote=canary: the live server's log directory.")
    sub.add_argument("--traffic_config_file", help="--promote=canary: the server's traffic file.")
    sub.add_argument(
      "--canary_flag",
      action="append",
      default=[],
      help="--promote=canary: a flag for mlops.rollout canary, e.g. --canary_flag=--step_weight=20.",
    )
    sub.add_argument("--model_config_file", help="TF Serving model config whose label moves.")
    sub.add_argument("--server", help="host:port of a model server to reload on promote.")
    sub.add_argument(
      "--feedback",
      help="Feedback labels (request_id,label[,row]) CSV/JSONL; watch: default LOGS/feedback.jsonl.",
    )
  run.add_argument("--include_feedback_logs", help="Add these logs' labelled rows to training.")
  run.add_argument("--trigger", default="manual", help="What started this run (manual, ci).")
  watch.add_argument("--logs", required=True, help="The prediction log directory.")
  watch.add_argument("--every_s", type=float, required=True, help="Seconds between passes.")
  watch.add_argument("--max_iterations", type=int, help="Stop after N passes (tests, CronJob).")
  watch.add_argument("--state_file", help="Guard state (default ROOT/NAME/watch_state.json).")
  watch.add_argument("--window_requests", type=int, default=500, help="Rows per window.")
  watch.add_argument("--min_window_rows", type=int, default=100, help="Smallest judged window.")
  watch.add_argument(
    "--rpc", default="Predict", choices=RPCS, help="Judge the logged traffic of this RPC."
  )
  defaults = pipeline_guards.Policy()
  watch.add_argument("--persistence_windows", type=int, default=defaults.persistence_windows)
  watch.add_argument("--cooldown_s", type=float, default=defaults.cooldown_s)
  watch.add_argument("--min_new_labels", type=int, default=defaults.min_new_labels)
  watch.add_argument("--max_retrains_per_day", type=int, default=defaults.max_retrains_per_day)
  return root


def _default_feedback(args: argparse.Namespace) -> None:
  """`watch` without --feedback reads the labels the model server collects beside its logs."""
  if args.command == "watch" and args.feedback is None:
    from serving.server.log_format import FEEDBACK_FILE

    collected = os.path.join(args.logs, FEEDBACK_FILE)
    args.feedback = collected if os.path.isfile(collected) else None


def run_options(args: argparse.Namespace, overrides: list[str]) -> pipeline_run.RunOptions:
  _default_feedback(args)
  feedback_logs = getattr(args, "include_feedback_logs", None)
  if args.command == "watch" and args.feedback and args.data:
    feedback_logs = args.logs  # A retrain learns from the traffic that raised the alert.
  return pipeline_run.RunOptions(
    config=args.config,
    name=args.name,
    root=args.root,
    export_base=args.export_base,
    data=args.data,
    include_feedback_logs=feedback_logs,
    feedback=args.feedback if feedback_logs else None,
    gate=args.gate,
    promote=args.promote,
    model_config_file=args.model_config_file,
    server=args.server,
    config_overrides=tuple(overrides),
    canary_logs=args.canary_logs or (args.logs if args.command == "watch" else None),
    traffic_config_file=args.traffic_config_file,
    canary_flags=tuple(args.canary_flag),
    trigger={"kind": getattr(args, "trigger", "watch")},
  )


def watch_options(args: argparse.Namespace) -> pipeline_watch.WatchOptions:
  _default_feedback(args)
  return pipeline_watch.WatchOptions(
    name=args.name,
    logs=args.logs,
    every_s=args.every_s,
    state_file=args.state_file or os.path.join(args.root, args.name, "watch_state.json"),
    policy=pipeline_guards.Policy(
      persistence_windows=args.persistence_windows,
      cooldown_s=args.cooldown_s,
      min_new_labels=args.min_new_labels,
      max_retrains_per_day=args.max_retrains_per_day,
    ),
    feedback=args.feedback,
    max_iterations=args.max_iterations,
    window_requests=args.window_requests,
    min_window_rows=args.min_window_rows,
    rpc=args.rpc,
  )


def main(argv: list[str] | None = None, quiet_native_logs: bool = False) -> None:
  """The CLI. Bad input (checked before TensorFlow loads) exits 1 with one `error:` line."""
  argv = sys.argv[1:] if argv is None else argv
  # --config.a.b=V overrides go to the trainer unchanged.
  overrides = [a for a in argv if a.startswith(("--config.", "--noconfig."))]
  args = parser().parse_args([a for a in argv if a not in overrides])
  from mlops.registry_store import RegistryError
  from trainer import log_filter
  from trainer.errors import ConfigError

  log_filter.quiet_library_info_logs()
  try:
    options = run_options(args, overrides)
    pipeline_run.check_options(options)
    pipeline_guards.PipelineLock(options.lock_path()).check_free()
    if args.command == "watch":
      watching = watch_options(args)
      pipeline_watch.check_inputs(watching)
    if quiet_native_logs:  # After the checks: TensorFlow's import costs seconds.
      from serving import native_logs

      native_logs.quiet_native_logs(sys.argv)
    if args.command == "run":
      sys.exit(_run(options))
    stop = threading.Event()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
      signal.signal(stop_signal, lambda *_: stop.set())
    state = pipeline_watch.watch(watching, options, stop=stop, report=print)
    print(
      f"watch ended: {len(state.retrain_times)} retrain(s) in the last 24 h; "
      f"last outcome {state.last_outcome or 'none'}"
    )
  except (pipeline_run.PipelineError, pipeline_guards.GuardError, RegistryError, ConfigError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def _run(options: pipeline_run.RunOptions) -> int:
  result = pipeline_run.run_pipeline(options)
  print(f"pipeline {result.outcome}: {result.message}")
  print(f"record: {result.record_path} (MLflow run {result.mlflow_run_id})")
  if result.outcome == "failed":
    print(f"error: {' '.join(result.message.split())}", file=sys.stderr)
    return 1
  return 0 if result.outcome == "promoted" else 2


if __name__ == "__main__":
  main(quiet_native_logs=True)
