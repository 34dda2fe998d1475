"""Continuous training (mlops.pipeline): the watch guards on fake monitor results and a fake
clock; the lock; one smoke `run` end to end that promotes v1, and a second whose gate fails and
is not promoted; bad input as one `error:` line with nothing promoted."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from mlops import pipeline_data, pipeline_guards, pipeline_run, pipeline_watch, registry_store
from mlops.pipeline_guards import Observation, Policy, State
from tests.helpers import model_server, pipeline_gates

REPO = model_server.REPO
ALERT = ("drift",)
POLICY = Policy(persistence_windows=2, cooldown_s=600, min_new_labels=50, max_retrains_per_day=2)


def _seen(alerts: list[tuple[str, ...]], labelled: int) -> Observation:
  return Observation(tuple(alerts), labelled)


def test_an_alert_must_persist_for_k_windows():
  one = pipeline_guards.decide(POLICY, State(), _seen([(), ALERT], 500), now=0)
  assert not one.retrain and "1 window(s) in a row; needs 2" in one.reason
  broken = pipeline_guards.decide(POLICY, State(), _seen([ALERT, (), ALERT], 500), now=0)
  assert not broken.retrain
  two = pipeline_guards.decide(POLICY, State(), _seen([ALERT, ("accuracy", "drift")], 500), now=0)
  assert two.retrain and two.alerts == ["accuracy", "drift"]


def test_cooldown_min_new_labels_and_daily_cap():
  state = pipeline_guards.record_outcome(State(), _seen([ALERT], 100), now=1000, outcome="promoted")
  alerting = [ALERT, ALERT]
  few = pipeline_guards.decide(POLICY, state, _seen(alerting, 149), now=5000)
  assert not few.retrain and "49 new labelled rows" in few.reason
  cooling = pipeline_guards.decide(POLICY, state, _seen(alerting, 150), now=1500)
  assert not cooling.retrain and "cooldown: 100 s left" in cooling.reason
  assert pipeline_guards.decide(POLICY, state, _seen(alerting, 150), now=1600).retrain
  state = pipeline_guards.record_outcome(state, _seen(alerting, 150), now=1600, outcome="promoted")
  capped = pipeline_guards.decide(POLICY, state, _seen(alerting, 999), now=9000)
  assert not capped.retrain and "daily cap: 2 retrains" in capped.reason
  # The cap is a rolling 24 hours: a day after the first retrain one more may start.
  assert pipeline_guards.decide(POLICY, state, _seen(alerting, 999), now=1000 + 86400).retrain


def test_a_rejected_candidate_blocks_retrains_until_new_labelled_data():
  rejected = pipeline_guards.record_outcome(State(), _seen([ALERT], 80), now=0, outcome="rejected")
  assert rejected.blocked_at_labels == 80
  no_cap = Policy(persistence_windows=1, cooldown_s=0, min_new_labels=0, max_retrains_per_day=99)
  same = pipeline_guards.decide(no_cap, rejected, _seen([ALERT], 80), now=10**6)
  assert not same.retrain and "failed its gate at 80 labelled rows" in same.reason
  assert pipeline_guards.decide(no_cap, rejected, _seen([ALERT], 81), now=10**6).retrain
  promoted = pipeline_guards.record_outcome(rejected, _seen([ALERT], 81), 10**6, "promoted")
  assert promoted.blocked_at_labels is None


def test_state_file_round_trips_and_a_corrupt_one_is_an_error(tmp_path):
  path = str(tmp_path / "state.json")
  assert pipeline_guards.read_state(path) == State()
  state = State((1.0, 2.0), 30, 30, "rejected")
  pipeline_guards.write_state(path, state)
  assert pipeline_guards.read_state(path) == state
  assert os.listdir(tmp_path) == ["state.json"]  # No temporary left beside it.
  (tmp_path / "state.json").write_text("[1, 2")
  with pytest.raises(pipeline_guards.GuardError, match="not a watch state file"):
    pipeline_guards.read_state(path)


def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
  path = str(tmp_path / "pipeline.lock")
  with pipeline_guards.PipelineLock(path):
    assert pipeline_guards.PipelineLock(path).holder()["pid"] == os.getpid()
    with pytest.raises(pipeline_guards.GuardError, match=f"already running \\(pid {os.getpid()}"):
      pipeline_guards.PipelineLock(path).acquire()
  assert not os.path.exists(path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(path, "w") as f:  # What a crashed pipeline leaves behind.
    json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": 0}, f)
  with pipeline_guards.PipelineLock(path):
    assert pipeline_guards.PipelineLock(path).holder()["pid"] == os.getpid()
  with open(path, "w") as f:  # Another host's holder cannot be checked: it is honoured.
    json.dump({"pid": dead.pid, "host": "elsewhere", "started": 0}, f)
  with pytest.raises(pipeline_guards.GuardError, match="on elsewhere"):
    pipeline_guards.PipelineLock(path).acquire()


def test_watch_retrains_once_and_not_again_on_the_same_data_after_a_rejection(tmp_path):
  """Five passes with a persisting alert: one retrain (rejected), three held back on the same
  labelled rows, then new labels arrive and the fifth pass retrains again."""
  labelled = iter([100, 100, 100, 100, 160])
  clock = iter(range(0, 10**6, 1000))
  runs = []

  def fake_run(options):
    runs.append(options.trigger)
    return pipeline_run.PipelineResult("rejected", len(runs) + 1, f"run{len(runs)}", "p", "no")

  options = pipeline_watch.WatchOptions(
    name="digits",
    logs=str(tmp_path),
    every_s=0.01,
    state_file=str(tmp_path / "s.json"),
    policy=Policy(persistence_windows=2, cooldown_s=0, min_new_labels=10, max_retrains_per_day=9),
    max_iterations=5,
  )
  lines = []
  state = pipeline_watch.watch(
    options,
    pipeline_run.RunOptions(config="c.py", name="digits"),
    observe=lambda _: _seen([ALERT, ALERT], next(labelled)),
    run=fake_run,
    clock=lambda: float(next(clock)),
    report=lines.append,
  )
  assert [t["labelled_rows"] for t in runs] == [100, 160]
  assert runs[0]["kind"] == "watch" and runs[0]["alerts"] == ["drift"]
  assert sum("waiting for new labelled data" in line for line in lines) == 3
  assert state.blocked_at_labels == 160 and len(state.retrain_times) == 2
  assert pipeline_guards.read_state(options.state_file) == state
  events = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
  assert [e["retrain"] for e in events] == [True, False, False, False, True]


def test_window_alerts_name_drift_and_accuracy():
  class Window:
    def __init__(self, judged, drift=False, accuracy=None):
      self.judged, self.dataset_drift, self.prediction_drift = judged, drift, False
      self.accuracy = accuracy

  accuracy = type("Accuracy", (), {"alert": True})()
  windows = [Window(True), Window(False), Window(True, drift=True, accuracy=accuracy)]
  assert pipeline_watch.window_alerts(windows) == ((), ("drift", "accuracy"))


def test_feedback_rows_join_the_training_split_only(tmp_path):
  from tests.helpers import prediction_logs

  data = tmp_path / "data"
  data.mkdir()
  rng = np.random.default_rng(0)
  for split in ("train", "validation", "test"):
    np.savez(data / f"{split}.npz", inputs=rng.random((20, 8, 8, 1)), labels=np.arange(20) % 10)
  rows = rng.random((6, 64)).astype(np.float32)
  ids = prediction_logs.write_log(
    str(tmp_path / "logs" / "a.log"), rows, {"scores": np.zeros((6, 10), np.float32)}
  )
  classified = rng.random((2, 64)).astype(np.float32)  # A Classify's two tf.Examples.
  _write_classify_log(str(tmp_path / "logs" / "b.log"), classified, "c0")
  feedback = f"{ids[1]},3\n{ids[4]},7\nnope,1\nc0,5,1\n"
  (tmp_path / "fb.csv").write_text("request_id,label,row\n" + feedback)
  prepared = pipeline_data.prepare(
    str(data), str(tmp_path / "logs"), str(tmp_path / "fb.csv"), "digits", str(tmp_path / "out")
  )
  assert prepared.feedback_rows == 3
  added = np.load(tmp_path / "out" / "train-1-feedback.npz")
  assert added["inputs"].shape == (3, 8, 8, 1) and added["labels"].tolist() == [3, 7, 5]
  np.testing.assert_array_equal(added["inputs"][1].reshape(64), rows[4])
  np.testing.assert_array_equal(added["inputs"][2].reshape(64), classified[1])
  flags = dict(o.removeprefix("--config.data.").split("=", 1) for o in prepared.overrides)
  assert flags["train_path"].endswith("out/train-*.npz") and flags["name"] == "npz"
  assert flags["test_path"] == str(data / "test.npz")  # The gate's test split stays the user's.


def _write_classify_log(path: str, rows: np.ndarray, request_ids, model: str = "digits") -> None:
  """One-row Classify records of `rows` under `request_ids` (one id: one record of every row)."""
  from mlops import prediction_log
  from tests.helpers import prediction_logs

  ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
  groups = [rows] if len(ids) == 1 else [row[None] for row in rows]
  records = []
  for request_id, group in zip(ids, groups, strict=True):
    meta = prediction_log.RecordMetadata(request_id, 1, model, 1, rpc="Classify")
    records.append(prediction_logs.classify_record(group, meta))
  prediction_log.write_records(path, records)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "mlops.pipeline", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, **(env or {})},
  )


def _one_error_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
  assert done.returncode == 1, done.stderr
  errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


def test_bad_input_is_one_error_line(tmp_path):
  config = "--config=configs/digits_cnn.py:smoke"
  root = f"--root={tmp_path}"
  _one_error_line(
    _cli("run", config, "--name=x", root, "--promote=canary", f"--canary_logs={tmp_path}"),
    "--promote=canary needs --traffic_config_file, --model_config_file, --server",
  )
  _one_error_line(
    _cli("watch", config, "--name=x", root, "--logs=/nonexistent/logs", "--every_s=60"),
    "--logs=/nonexistent/logs",
  )
  _one_error_line(
    _cli("watch", config, "--name=no_such_model", root, f"--logs={tmp_path}", "--every_s=60"),
    "no_such_model",
  )
  _one_error_line(
    _cli("run", config, "--name=x", root, f"--include_feedback_logs={tmp_path}", "--feedback=f"),
    "needs --data",
  )
  _one_error_line(
    _cli("run", config, "--name=x", root, "--config.train.num_stepz=3"), "num_stepz", "num_steps"
  )
  # A pipeline started while one runs (this test process holds the lock): nothing trained.
  with pipeline_guards.PipelineLock(os.path.join(str(tmp_path), "pipeline.lock")):
    done = _cli("run", config, "--name=x", root)
  _one_error_line(done, "a pipeline is already running", f"pid {os.getpid()}")
  assert sorted(os.listdir(tmp_path)) == ["pipeline.lock.guard"]


def test_run_promotes_v1_and_never_promotes_a_candidate_that_fails_its_gate(tmp_path, monkeypatch):
  # The training processes on one CPU device: the 8 fake devices of this session only slow
  # their compilation (this process's JAX has already started with them).
  monkeypatch.setenv("XLA_FLAGS", "")
  client = registry_store.client()
  name = "pipeline_digits"  # The session's throwaway store (conftest) holds other tests' models.
  gates = {}
  for verdict, floor in (("pass", 0.2), ("fail", 1.01)):
    gates[verdict] = pipeline_gates.write_gate(tmp_path / f"{verdict}.py", floor)
  options = pipeline_run.RunOptions(
    config=os.path.join(REPO, "configs", "digits_cnn.py:smoke"),
    name=name,
    root=str(tmp_path / "pipeline"),
    export_base=str(tmp_path / "models" / name),
    gate=str(gates["pass"]),
    config_overrides=("--noconfig.tracking.report",),
    trigger={"kind": "ci"},
  )
  first = pipeline_run.run_pipeline(options)
  assert (first.outcome, first.version) == ("promoted", 1), first.message
  assert registry_store.alias_version(client, name, "production") == 1
  run = client.get_run(first.mlflow_run_id)
  tags = run.data.tags
  assert run.info.status == "FINISHED" and tags["pipeline.trigger"] == "ci"
  assert {tags[f"pipeline.step.{s}"] for s in ("train", "register", "validate", "promote")} == {
    "ok"
  }
  assert tags["pipeline.version"] == "1" and tags["pipeline.outcome"] == "promoted"
  assert client.get_run(tags["pipeline.training_run_id"]).info.status == "FINISHED"
  assert client.get_model_version(name, "1").tags["pipeline.run_id"] == first.mlflow_run_id
  with open(first.record_path) as f:
    assert [s["step"] for s in json.load(f)["steps"]] == [
      "train",
      "register",
      "validate",
      "promote",
    ]

  second = pipeline_run.run_pipeline(
    pipeline_run.RunOptions(**{**options.__dict__, "gate": str(gates["fail"])})
  )
  assert (second.outcome, second.version) == ("rejected", 2), second.message
  assert "quality.accuracy_floor" in second.message
  assert registry_store.alias_version(client, name, "production") == 1
  tags = client.get_run(second.mlflow_run_id).data.tags
  assert tags["pipeline.step.validate"] == "rejected" and tags["pipeline.step.promote"] == "skipped"
  assert tags["pipeline.gate_failed"] == "quality.accuracy_floor"
  assert client.get_model_version(name, "2").tags["gate.verdict"] == "fail"
  assert not os.path.exists(options.lock_path())
  _watch_sees_drift_through_the_real_monitor(tmp_path, name, options)


def _watch_sees_drift_through_the_real_monitor(tmp_path, name, run_options):
  """Traffic whose inputs drift (uniform noise, not digits), with feedback labels, logged for
  production (v1): one real monitor pass flags drift in every window and starts one retrain."""
  from tests.helpers import prediction_logs

  saved_model = str(tmp_path / "models" / name / "1")
  rows = np.random.default_rng(0).uniform(0, 16, (300, 64)).astype(np.float32)
  logs = tmp_path / "logs"
  ids = prediction_logs.write_log(
    str(logs / "a.log"), rows, prediction_logs.served_outputs(saved_model, rows), model_name=name
  )
  feedback = tmp_path / "feedback.csv"
  feedback.write_text("request_id,label\n" + "".join(f"{i},{n % 10}\n" for n, i in enumerate(ids)))
  options = pipeline_watch.WatchOptions(
    name=name,
    logs=str(logs),
    every_s=0.01,
    state_file=str(tmp_path / "watch" / "state.json"),
    policy=Policy(persistence_windows=3, cooldown_s=0, min_new_labels=300, max_retrains_per_day=1),
    feedback=str(feedback),
    max_iterations=1,
    window_requests=100,
    min_window_rows=100,
  )
  seen = pipeline_watch.observe_with_monitor(options)
  assert seen.labelled_rows == 300 and len(seen.window_alerts) == 3
  assert all("drift" in kinds for kinds in seen.window_alerts), seen.window_alerts
  # The same traffic as Classifies: judged with --rpc=Classify, invisible to a Predict watch.
  classify_logs = tmp_path / "classify_logs"
  classify_logs.mkdir()
  _write_classify_log(str(classify_logs / "a.log"), rows, ids, model=name)
  classify = pipeline_watch.WatchOptions(
    **{**options.__dict__, "logs": str(classify_logs), "rpc": "Classify"}
  )
  seen_classify = pipeline_watch.observe_with_monitor(classify)
  assert seen_classify.labelled_rows == 300 and len(seen_classify.window_alerts) == 3
  assert all("drift" in kinds for kinds in seen_classify.window_alerts)
  from mlops import monitor

  with pytest.raises(monitor.MonitorError, match="no record fits"):
    pipeline_watch.observe_with_monitor(dataclasses.replace(classify, rpc="Predict"))
  triggers = []
  pipeline_watch.watch(
    options,
    run_options,
    run=lambda o: (
      triggers.append(o.trigger) or pipeline_run.PipelineResult("promoted", 3, "r", "p", "ok")
    ),
    report=lambda _: None,
  )
  assert len(triggers) == 1 and "drift" in triggers[0]["alerts"]


def test_promote_canary_runs_the_controller_and_maps_its_exit_status(tmp_path, monkeypatch):
  from mlops import rollout

  traffic = tmp_path / "traffic.json"
  traffic.write_text("{}")
  options = pipeline_run.RunOptions(
    config="c.py",
    name="digits",
    promote="canary",
    canary_logs=str(tmp_path),
    traffic_config_file=str(traffic),
    model_config_file="m.config",
    server="127.0.0.1:8500",
    feedback="fb.csv",
    canary_flags=("--step_weight=25",),
  )
  pipeline_run.check_canary_options(options)
  command = pipeline_run.canary_command(options, 4, str(tmp_path / "out"))
  assert command[1:4] == ["-m", "mlops.rollout", "canary"]
  flags = rollout._canary_flags()  # The controller's own flag definitions parse the command.
  flags(["rollout canary", *command[4:]])
  assert (flags.name, flags.candidate, flags.step_weight, flags.feedback) == (
    "digits",
    4,
    25,
    "fb.csv",
  )
  answers = {
    0: ("digits version 4 (stable 3): promoted after 5 intervals", ""),
    2: ("digits version 4 (stable 3): rolled back after 5 intervals", ""),
    1: ("", "error: --logs=x is not a directory"),
  }
  for code, (out, err) in answers.items():
    done = subprocess.CompletedProcess(command, code, out, err)
    monkeypatch.setattr(pipeline_run.subprocess, "run", lambda *a, d=done, **k: d)
    if code == 1:
      with pytest.raises(pipeline_run.PipelineError, match="the canary failed: --logs=x"):
        pipeline_run.run_canary(options, 4, str(tmp_path / "out"))
    else:
      outcome, summary = pipeline_run.run_canary(options, 4, str(tmp_path / "out"))
      assert (outcome, summary) == (["promoted", "", "rolled_back"][code], out)
  rolled = pipeline_guards.record_outcome(State(), _seen([ALERT], 40), 0, "rolled_back")
  assert rolled.blocked_at_labels == 40  # A rolled-back canary is not retrained on the same data.


def test_run_exit_codes(monkeypatch, capsys):
  from mlops import pipeline

  for outcome, code in (("promoted", 0), ("rejected", 2), ("rolled_back", 2), ("failed", 1)):
    result = pipeline_run.PipelineResult(outcome, 2, "id", "p.json", f"it {outcome}")
    monkeypatch.setattr(pipeline_run, "run_pipeline", lambda _, r=result: r)
    assert pipeline._run(pipeline_run.RunOptions(config="c.py", name="d")) == code
  assert "error: it failed" in capsys.readouterr().err


def test_the_watch_stops_on_its_event(tmp_path):
  stop = threading.Event()
  stop.set()
  options = pipeline_watch.WatchOptions(
    name="d", logs=".", every_s=3600, state_file=str(tmp_path / "s.json"), policy=POLICY
  )
  seen = []
  pipeline_watch.watch(
    options,
    pipeline_run.RunOptions(config="c.py", name="d"),
    observe=lambda _: seen.append(1) or _seen([], 0),
    run=lambda _: pytest.fail("no alert, no run"),
    stop=stop,
    report=lambda _: None,
  )
  assert seen == [1]  # One pass, then the set event ends the wait at once.
