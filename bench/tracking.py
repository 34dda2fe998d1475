r"""What tracking and the study machinery cost (issue 11).

  .venv/bin/python bench/tracking.py            # about 6 minutes on 2 idle CPU cores
  .venv/bin/python bench/tracking.py --quick    # sanity run

1. Tracking on vs off: the digits config (cnn, batch 128, 600 steps, logs every 100, evals every 250)
   trained with MLflow tracking to a fresh SQLite store and with `config.tracking.enabled=False`,
   interleaved; the trainer's steps/s (compile and eval excluded). Goal >= 0.99.
2. One HPO trial vs `train_and_evaluate` directly: the same config and parameters (the trial's
   are fixed with `enqueue_trial`), wall time of `study.optimize(n_trials=1)` (storage, MLflow
   child run, reporting every eval to the pruner) against the direct call, interleaved, both
   tracked. Goal <= 1.05.
3. Trials per minute on PostgreSQL (tests/helpers/postgres.py starts one): `python -m mlops.hpo`
   with 1 worker and with 2 workers sharing the study, same number of trials.

Run on one CPU device per process (no --xla_force_host_platform_device_count). Results:
docs/benchmarks.md.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import harness

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import optuna

from configs import digits_cnn
from mlops import hpo_trials as hpo
from mlops.hpo_tracking import Lineage, StudyTracker


def _config(num_steps: int):
  config = digits_cnn.get_config()
  config.train.num_steps = num_steps
  config.tracking.report = False  # Timed separately: it runs after the loop.
  return config


def tracking_overhead(repeats: int, num_steps: int, root: str) -> tuple[float, list, list]:
  os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
  on, off = [], []
  for _ in range(repeats):
    for enabled, out in ((False, off), (True, on)):
      config = _config(num_steps)
      config.tracking.enabled = enabled
      result = harness.run_trainer(config, root)
      if enabled and result.tracking.not_logged:
        raise RuntimeError(f"tracking lost records: {result.tracking.describe()}")
      out.append(result.steps_per_sec)
  return statistics.median(on) / statistics.median(off), on, off


def trial_overhead(repeats: int, num_steps: int, root: str) -> tuple[float, list, list]:
  config = _config(num_steps)
  params = {"optim.learning_rate": 3e-3, "optim.weight_decay": 1e-4, "model.dropout_rate": 0.1}
  trial_s, direct_s = [], []
  for i in range(repeats):
    start = time.perf_counter()
    harness.run_trainer(hpo.apply_overrides(config, params), root)
    direct_s.append(time.perf_counter() - start)

    storage = f"sqlite:///{root}/hpo-{i}.db"
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize")
    study.enqueue_trial(params)
    search = hpo.Search(
      config=config,
      config_arg="configs/digits_cnn.py",
      search_space=digits_cnn.get_search_space,
      study_dir=tempfile.mkdtemp(prefix="study_", dir=root),
      n_trials=1,
      metric="accuracy",
      maximize=True,
    )
    start = time.perf_counter()
    tracker = StudyTracker(config, Lineage("bench", "tpe", "median", 0, storage))
    tracker.start(study, storage)
    study.optimize(hpo.make_objective(search, study, tracker), n_trials=1)
    trial_s.append(time.perf_counter() - start)
  return statistics.median(trial_s) / statistics.median(direct_s), trial_s, direct_s


def workers_throughput(n_trials: int, num_steps: int, root: str) -> dict[int, float]:
  """Trials per minute with 1 and 2 workers on PostgreSQL."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests.helpers import postgres

  bin_dir = postgres.find_bin_dir()
  if bin_dir is None:
    raise SystemExit("PostgreSQL binaries not found: apt-get install postgresql")
  server = postgres.PostgresServer(bin_dir)
  server.start()
  rates = {}
  try:
    for workers in (1, 2):
      storage = server.database(f"bench_{workers}")
      args = [
        sys.executable, "-m", "mlops.hpo", "--config=configs/digits_cnn.py",
        f"--config.train.num_steps={num_steps}", "--config.tracking.report=False",
        f"--study=w{workers}", f"--n_trials={n_trials}", "--pruner=none",
        f"--storage={storage}", f"--study_dir={root}/w{workers}",
      ]  # fmt: skip
      start = time.perf_counter()
      procs = [subprocess.Popen(args, stdout=subprocess.DEVNULL) for _ in range(workers)]
      codes = [p.wait(timeout=3600) for p in procs]
      minutes = (time.perf_counter() - start) / 60
      if any(codes):
        raise RuntimeError(f"a worker failed: exit codes {codes}")
      study = optuna.load_study(study_name=f"w{workers}", storage=storage)
      done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
      rates[workers] = done / minutes
  finally:
    server.stop()
  return rates


def _fmt(values: list[float]) -> str:
  return ", ".join(f"{v:.1f}" for v in values)


def main() -> None:
  quick = "--quick" in sys.argv
  harness.require_one_cpu_device()
  harness.quiet_logs()
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  print("\n".join(harness.machine_description()))
  with tempfile.TemporaryDirectory(prefix="bench_tracking_") as root:
    repeats, steps = (1, 300) if quick else (3, 600)
    ratio, on, off = tracking_overhead(repeats, steps, root)
    print(f"tracking on/off steps/s: {ratio:.3f} (on {_fmt(on)}, off {_fmt(off)})")
    ratio, trial_s, direct_s = trial_overhead(repeats, 300, root)
    print(
      f"HPO trial / direct wall time: {ratio:.3f} (trial {_fmt(trial_s)} s, direct {_fmt(direct_s)} s)"
    )
    rates = workers_throughput(2 if quick else 4, 100, root)
    print(
      f"trials/min on PostgreSQL: 1 worker {rates[1]:.2f}, 2 workers {rates[2]:.2f}, "
      f"ratio {rates[2] / rates[1]:.2f}"
    )


if __name__ == "__main__":
  main()
