"""MLflow tracking of training runs: what is logged, resume, end states, and a failing store."""

import json
import os
import signal
import time

import pytest
from mlflow import MlflowClient

from mlops import report_records
from trainer import tracking, train
from trainer.metrics import flatten_config


@pytest.fixture
def store(tmp_path, monkeypatch):
  """A fresh SQLite store for one test."""
  uri = f"sqlite:///{tmp_path}/store/mlflow.db"
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
  return uri


def _run(uri: str, workdir) -> object:
  record = tracking.read_run_file(str(workdir))
  assert record["tracking_uri"] == uri
  return MlflowClient(uri).get_run(record["run_id"])


def test_run_logs_params_metrics_tags_and_artifacts(store, smoke_config, one_device, tmp_path):
  smoke_config.tracking.report = True
  smoke_config.description = "tracking test"
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(smoke_config, str(workdir), devices=one_device)

  assert result.tracking.not_logged == {}
  run = _run(store, workdir)
  client = MlflowClient(store)
  assert run.info.status == "FINISHED"
  assert client.get_experiment(run.info.experiment_id).name == "tests"  # The env var won.
  assert run.data.params == {k: str(v) for k, v in flatten_config(smoke_config).items()}
  # Every TensorBoard scalar, at the same steps.
  scalars = report_records.read_scalars(str(workdir / "tensorboard"))
  assert set(run.data.metrics) == set(scalars)
  for tag, (steps, values) in scalars.items():
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
    assert [s for s, _ in history] == list(steps), tag
    assert [v for _, v in history] == pytest.approx(list(values), rel=1e-6), tag
  manifest = json.loads((workdir / "manifest.json").read_text())
  tags = run.data.tags
  assert tags["git.commit"] == manifest["git"]["commit"]
  assert tags["git.dirty"] == str(manifest["git"]["dirty"])
  assert tags["data.fingerprint"] == manifest["data_fingerprint"]
  assert tags["mesh"] == "data=1,fsdp=1,tensor=1"
  assert tags["devices.count"] == "8" and tags["process_count"] == "1"
  assert tags["packages.jax"] == manifest["packages"]["jax"]
  assert tags["mlflow.note.content"] == "tracking test"
  assert tags["run.outcome"] == "completed"
  artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
  assert {"manifest.json", "config.json", "report"} <= artifacts
  report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
  assert {"report/report.md", "report/curves.png", "report/confusion_matrix.png"} <= report
  # The SQLite store keeps artifacts next to itself, not in the working directory.
  assert run.info.artifact_uri.startswith(str(tmp_path / "store" / "mlruns"))


def test_resume_continues_the_same_run(store, smoke_config, one_device, tmp_path):
  workdir = tmp_path / "run"
  smoke_config.train.num_steps = 10
  train.train_and_evaluate(smoke_config, str(workdir), devices=one_device)
  first = _run(store, workdir)
  smoke_config.train.num_steps = 20
  result = train.train_and_evaluate(smoke_config, str(workdir), devices=one_device)

  run = _run(store, workdir)
  assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
  assert result.tracking.not_logged == {}
  history = MlflowClient(store).get_metric_history(run.info.run_id, "train/loss")
  assert sorted(m.step for m in history) == [5, 10, 15, 20]
  assert run.data.params["train.num_steps"] == "10"  # MLflow params never change...
  assert run.data.tags["resume.changed_params"] == "train.num_steps: 10 -> 20"  # ...so say so.


def test_preempted_run_ends_killed_and_failed_run_ends_failed(
  store, smoke_config, one_device, tmp_path
):
  def preempt(step, metrics):
    os.kill(os.getpid(), signal.SIGTERM)  # The trainer's preemption handler catches it.
    return False

  result = train.train_and_evaluate(
    smoke_config, str(tmp_path / "preempted"), devices=one_device, on_eval=preempt
  )
  assert result.preempted
  assert _run(store, tmp_path / "preempted").info.status == "KILLED"

  def fail(step, metrics):
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    train.train_and_evaluate(
      smoke_config, str(tmp_path / "failed"), devices=one_device, on_eval=fail
    )
  run = _run(store, tmp_path / "failed")
  assert run.info.status == "FAILED"
  assert run.data.tags["run.outcome"] == "RuntimeError: boom"


def test_on_eval_callback_stops_the_run_with_a_checkpoint(
  store, smoke_config, one_device, tmp_path
):
  seen = []

  def stop_after_first(step, metrics):
    seen.append((step, sorted(metrics)))
    return True

  result = train.train_and_evaluate(
    smoke_config, str(tmp_path / "run"), devices=one_device, on_eval=stop_after_first
  )
  assert seen == [(10, ["eval/accuracy", "eval/loss"])]
  assert result.step == 10 and result.stopped_by_callback and not result.stopped_early
  assert 10 in report_records.checkpointing.existing_steps(str(tmp_path / "run"))


def test_metrics_are_held_between_uploads_and_sent_before_other_records(
  store, smoke_config, tmp_path, monkeypatch
):
  smoke_config.tracking.metrics_every_s = 60.0
  uploads = []  # The steps of each log_batch call that carried metrics.
  original = MlflowClient.log_batch

  def recording_log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
    if metrics:
      uploads.append(sorted({m.step for m in metrics}))
    return original(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

  monkeypatch.setattr(MlflowClient, "log_batch", recording_log_batch)
  tracker = tracking.RunTracker(smoke_config, str(tmp_path / "run"))
  tracker.log_metrics(1, {"train/loss": 1.0})
  deadline = time.monotonic() + 30
  while not uploads and time.monotonic() < deadline:  # The first metrics go at once.
    time.sleep(0.01)
  assert uploads == [[1]]
  for step in (2, 3, 4):
    tracker.log_metrics(step, {"train/loss": 1.0 / step})
  tracker.set_tags({"note": "sends the metrics held before it"})
  tracker.log_metrics(5, {"train/loss": 0.2})
  summary = tracker.end("FINISHED")

  assert summary.not_logged == {}
  assert uploads == [[1], [2, 3, 4], [5]]
  history = MlflowClient(store).get_metric_history(summary.run_id, "train/loss")
  assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_failing_store_never_changes_training(smoke_config, one_device, tmp_path, monkeypatch):
  smoke_config.tracking.enabled = False
  baseline = train.train_and_evaluate(smoke_config, str(tmp_path / "baseline"), devices=one_device)

  (tmp_path / "not_a_dir").write_text("a file where the store's directory should be")
  smoke_config.tracking.enabled = True
  smoke_config.tracking.flush_timeout_s = 3.0
  for name, uri in [
    ("unwritable_sqlite", f"sqlite:///{tmp_path}/not_a_dir/mlflow.db"),
    ("unreachable_postgresql", f"postgresql+psycopg://u:p@127.0.0.1:{_free_port()}/mlflow"),
  ]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = train.train_and_evaluate(smoke_config, str(tmp_path / name), devices=one_device)

    assert result.eval_metrics == baseline.eval_metrics, name
    assert result.logged_losses == baseline.logged_losses, name
    assert result.step == baseline.step, name
    summary = result.tracking
    assert summary.run_id is None and summary.not_logged["metrics"] > 0, name
    assert summary.not_logged["params"] == len(flatten_config(smoke_config)), name
    assert "NOT logged" in summary.describe() and uri in summary.describe(), name
    assert not os.path.exists(tmp_path / name / tracking.RUN_FILE), name


def test_settings_env_wins_over_config(smoke_config, monkeypatch):
  monkeypatch.delenv("MLFLOW_TRACKING_URI")
  monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
  smoke_config.tracking.uri = ""
  settings = tracking.resolve_settings(smoke_config)
  assert settings.uri == tracking.DEFAULT_TRACKING_URI
  assert settings.uri == f"sqlite:///{tracking.PROJECT_ROOT}/mlflow.db"
  smoke_config.tracking.uri = "http://mlflow.example:5000"
  smoke_config.tracking.experiment = "from-config"
  settings = tracking.resolve_settings(smoke_config)
  assert (settings.uri, settings.experiment) == ("http://mlflow.example:5000", "from-config")
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
  monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
  settings = tracking.resolve_settings(smoke_config)
  assert (settings.uri, settings.experiment) == ("sqlite:////elsewhere/mlflow.db", "from-env")
  assert settings.artifact_location == "/elsewhere/mlruns"
