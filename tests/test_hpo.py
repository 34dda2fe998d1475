"""Hyperparameter search (python -m mlops.hpo): bad input, reproducibility, pruning, and workers
sharing a study on a real PostgreSQL (tests/helpers/postgres.py), one of them SIGKILLed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient

from mlops import hpo_study
from mlops import hpo_trials as hpo
from mlops.hpo_tracking import Lineage, StudyTracker
from tests.helpers.configs import smoke_config
from trainer import tracking
from trainer.errors import ConfigError

# Trials train the digits smoke config for a few steps on one CPU device, without the report.
_BASE = [
  "--config=configs/digits_cnn.py:smoke",
  "--config.eval.every_steps=5",
  "--config.tracking.report=False",
  "--config.data.worker_threads=0",
]
_FAST = [*_BASE, "--config.train.num_steps=10"]


def _env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # One device per worker: the trials are tiny.
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _hpo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "mlops.hpo", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=_env(),
  )


def _start_worker(*args: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "mlops.hpo", *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=_env(),
  )


def _one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "Traceback" not in out.stderr, out.stderr[-2000:]
  for fragment in fragments:
    assert fragment in last, last


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_bad_input_is_one_line_and_exit_1(tmp_path):
  no_space = tmp_path / "no_space.py"
  no_space.write_text(
    "from configs import digits_cnn\n\ndef get_config(arg=None):\n  return digits_cnn.get_config(arg)\n"
  )
  storage = f"sqlite:///{tmp_path}/hpo.db"
  common = ["--study=s", f"--storage={storage}", f"--study_dir={tmp_path}/s"]
  _one_line_error(_hpo(f"--config={no_space}", *common), "get_search_space", str(no_space))
  _one_line_error(_hpo(*_FAST, *common, "--sampler=bayes"), "--sampler='bayes'", "tpe")
  _one_line_error(_hpo(*_FAST, *common, "--pruner=asha"), "--pruner='asha'", "median")
  port = _free_port()
  unreachable = f"postgresql+psycopg://user:secret@127.0.0.1:{port}/optuna"
  out = _hpo(*_FAST, "--study=s", f"--storage={unreachable}")
  _one_line_error(out, "cannot reach", f"127.0.0.1:{port}/optuna")
  assert "secret" not in out.stderr  # The password is not echoed.
  optuna.create_study(study_name="min", storage=storage, direction="minimize")
  out = _hpo(*_FAST, "--study=min", f"--storage={storage}", f"--study_dir={tmp_path}/min")
  _one_line_error(out, "'min'", "minimize", "maximize")
  assert not os.path.exists(tmp_path / "min")  # Nothing half-written.


def test_unreachable_storage_is_named_within_10_s():
  url = f"postgresql+psycopg://u@127.0.0.1:{_free_port()}/x"
  with pytest.raises(ConfigError, match="cannot reach"):
    hpo_study.open_storage(url, 10)  # Loads the drivers (seconds on a loaded machine).
  start = time.monotonic()
  with pytest.raises(ConfigError, match="cannot reach"):
    hpo_study.open_storage(url, 10)
  # The failure itself is bounded: no retry loop, connect_timeout for hosts that never answer.
  assert time.monotonic() - start < 10


def test_grid_of_a_search_space():
  from configs import lm

  grid = hpo_study.grid_of(lm.get_search_space)
  assert grid["optim.warmup_steps"] == [0, 50, 100, 150, 200]
  assert grid["optim.learning_rate"] == pytest.approx([1e-4, 1e-3, 1e-2])


def test_same_seed_and_fresh_storage_suggest_the_same_parameters(tmp_path):
  params = []
  for name in ("a", "b"):
    out = _hpo(
      *_FAST,
      "--study=s",
      "--n_trials=2",
      "--seed=7",
      "--pruner=none",
      f"--storage=sqlite:///{tmp_path}/{name}.db",
      f"--study_dir={tmp_path}/{name}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/{name}.db")
    params.append([t.params for t in study.trials])
  assert params[0] == params[1] and len(params[0]) == 2
  assert params[0][0] != params[0][1]
  best = json.loads((tmp_path / "a" / "best_overrides.json").read_text())
  assert best["overrides"] == params[0][best["trial"]]
  assert "--config.train.num_steps=10" in best["command"]
  assert "--config.optim.learning_rate=" in best["command"]
  assert (tmp_path / "a" / "optimization_history.png").stat().st_size > 5000


class _PruneAtFirstReport(optuna.pruners.BasePruner):
  def prune(self, study, trial) -> bool:
    return bool(trial.intermediate_values)


def test_a_pruned_trial_stops_at_once_with_its_checkpoint(tmp_path):
  config = smoke_config({"tracking.report": False})
  storage = f"sqlite:///{tmp_path}/hpo.db"
  study = optuna.create_study(
    study_name="p", storage=storage, pruner=_PruneAtFirstReport(), direction="maximize"
  )
  from configs import digits_cnn

  search = hpo.Search(
    config=config,
    config_arg="configs/digits_cnn.py:smoke",
    search_space=digits_cnn.get_search_space,
    study_dir=str(tmp_path / "p"),
    n_trials=1,
    metric="accuracy",
    maximize=True,
  )
  tracker = StudyTracker(config, Lineage("p", "tpe", "test", 0, storage))
  tracker.start(study, storage)
  study.optimize(hpo.make_objective(search, study, tracker), n_trials=1)

  trial = study.trials[0]
  assert trial.state == optuna.trial.TrialState.PRUNED
  assert list(trial.intermediate_values) == [10]  # Stopped at the first eval, of 20 steps.
  from trainer import checkpointing

  assert checkpointing.existing_steps(trial.user_attrs["workdir"]) == [10]
  record = tracking.read_run_file(trial.user_attrs["workdir"])
  run = MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
  assert run.data.tags["hpo.state"] == "PRUNED" and run.data.tags["hpo.trial"] == "0"
  assert run.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
  assert run.data.tags["run.outcome"] == "stopped_by_callback"


def test_workers_that_did_not_create_the_study_wait_for_its_parent_run(tmp_path):
  """Study user attributes are last-writer-wins: a worker that did not create the study makes
  no parent run of its own while the creator is about to name one, and then adopts it."""
  import threading

  config = smoke_config({"tracking.report": False})
  storage = f"sqlite:///{tmp_path}/hpo.db"
  study, was_created = hpo_study.create_or_load_study("w", storage, None, None, "maximize")
  assert was_created is True
  assert hpo_study.create_or_load_study("w", storage, None, None, "maximize")[1] is False
  joiner = StudyTracker(config, Lineage("w", "tpe", "none", 0, storage))
  waiting = threading.Thread(target=joiner.start, args=(study, storage), kwargs={"created": False})
  waiting.start()
  time.sleep(2.0)  # Far longer than creating a run takes.
  client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
  experiment = client.get_experiment_by_name(config.tracking.experiment)
  parents = lambda: client.search_runs(  # noqa: E731
    [experiment.experiment_id] if experiment else [], filter_string="tags.`hpo.study` = 'w'"
  )
  assert waiting.is_alive() and not (experiment and parents())
  creator = StudyTracker(config, Lineage("w", "tpe", "none", 0, storage))
  creator.start(study, storage, created=True)
  waiting.join(timeout=60)
  assert not waiting.is_alive() and joiner.parent_run_id == creator.parent_run_id
  experiment = client.get_experiment_by_name(config.tracking.experiment)
  assert [r.info.run_id for r in parents()] == [creator.parent_run_id]


def test_two_workers_share_a_study_on_postgresql(postgres, tmp_path):
  storage = postgres.database("two_workers")
  args = [
    *_FAST,
    "--study=shared",
    "--n_trials=4",
    "--pruner=none",
    f"--storage={storage}",
    f"--study_dir={tmp_path}/shared",
  ]
  # MLflow's first-time schema migration of a fresh SQLite store is not safe against two
  # processes at once (alembic's _alembic_tmp_* tables); create the store before the workers.
  MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments()
  workers = [_start_worker(*args) for _ in range(2)]
  for worker in workers:
    _, stderr = worker.communicate(timeout=1200)
    assert worker.returncode == 0, stderr[-3000:]

  study = optuna.load_study(study_name="shared", storage=storage)
  numbers = [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
  assert sorted(numbers) == [0, 1, 2, 3]  # Every trial once, four in all.
  assert len(study.trials) == 4
  assert len({t.user_attrs["workdir"] for t in study.trials}) == 4
  client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
  parent = study.user_attrs["mlflow_parent_run_id"]
  children = client.search_runs(
    [client.get_run(parent).info.experiment_id],
    filter_string=f"tags.mlflow.parentRunId = '{parent}'",
  )
  assert sorted(int(r.data.tags["hpo.trial"]) for r in children) == [0, 1, 2, 3]
  assert all(r.info.status == "FINISHED" for r in children)


def test_a_killed_workers_trial_fails_and_is_retried(postgres, tmp_path):
  storage = postgres.database("killed_worker")
  args = [
    *_BASE,
    "--config.train.num_steps=40",
    "--study=k",
    "--n_trials=2",
    "--pruner=none",
    f"--storage={storage}",
    f"--study_dir={tmp_path}/k",
    "--heartbeat_interval_s=1",
  ]
  victim = _start_worker(*args)
  deadline = time.monotonic() + 600
  try:
    # Kill it mid-training: once trial 0 has written TensorBoard events.
    while not list((tmp_path / "k" / "trial-0000" / "tensorboard").glob("events*")):
      assert time.monotonic() < deadline and victim.poll() is None
      time.sleep(0.5)
  finally:
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
  out = _hpo(*args, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]

  study = optuna.load_study(study_name="k", storage=storage)
  states = {t.number: t.state for t in study.trials}
  assert states[0] == optuna.trial.TrialState.FAIL
  retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
  assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
  assert retries[0].params == study.trials[0].params
  complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
  assert len(complete) == 2


def test_mlflow_run_logged_to_postgresql_reads_back(postgres, tmp_path, monkeypatch, one_device):
  from trainer import train

  uri = postgres.database("mlflow")
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  config = smoke_config(
    {"tracking.report": False, "tracking.artifact_location": str(tmp_path / "a")}
  )
  result = train.train_and_evaluate(config, str(tmp_path / "run"), devices=one_device)
  assert result.tracking.not_logged == {}
  run = MlflowClient(uri).get_run(result.tracking.run_id)
  assert run.info.status == "FINISHED"
  assert run.data.params["optim.learning_rate"] == str(config.optim.learning_rate)
  assert run.data.metrics["eval/accuracy"] == pytest.approx(result.eval_metrics["eval/accuracy"])
  history = MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")
  assert sorted(m.step for m in history) == sorted(result.logged_losses)
