"""The canary controller (mlops/canary*.py, `python -m mlops.rollout canary`): the checks on
synthetic prediction logs, the loop on a fake clock and registry (promotion after
max_weight/step_weight intervals, rollback after `threshold`, the traffic file at every step),
and end to end: the real MLflow registry, a real model server splitting real requests, a good
candidate promoted and an erroring one rolled back, with no failed request on the stable arm."""

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving", reason="logs are TF Serving protos (make install)")

from mlops import (
  canary,
  canary_checks,
  canary_traffic,
  prediction_log,
  registry_audit,
  registry_serving,
  registry_store,
  rollout,
)
from mlops.canary_checks import Thresholds
from mlops.prediction_log import RecordMetadata
from tests.helpers import model_server, shadow_models

T0 = 1_700_000_000.0  # seconds; synthetic records and the fake clock start here
GOOD = {"requests": 200, "errors": 0, "latency_us": 1000, "classes": None}


def _records(
  arm: str,
  start_s: float,
  span_s: float,
  *,
  requests=200,
  errors=0,
  latency_us=1000,
  classes=None,
  prefix="r",
) -> list[bytes]:
  """`requests` primary records of `arm` spread over [start_s, start_s + span_s): every
  (requests // errors)-th one an error, latencies around `latency_us`, predicted classes
  spread over 0..9 (so that errors take no class away) unless `classes` (a function of the index) says otherwise."""
  rng = np.random.default_rng(zlib.crc32(f"{arm}{start_s}".encode()))
  out = []
  for i in range(requests):
    failed = errors and i % (requests // errors) == 0
    meta = RecordMetadata(
      request_id=f"{prefix}-{arm}-{start_s}-{i}",
      time_us=int((start_s + span_s * i / requests) * 1e6),
      model_name="digits",
      version=1 if arm == "production" else 2,
      version_label=arm,
      arm=arm,
      latency_us=int(latency_us * rng.uniform(0.8, 1.2)),
      status_code=13 if failed else 0,
    )
    cls = classes(i) if classes else _spread(i)
    outputs = {} if failed else {"classes": np.array([cls], np.int32)}
    out.append(prediction_log.make_record({"inputs": np.zeros((1, 4), np.float32)}, outputs, meta))
  return out


def _spread(i: int) -> int:
  return (7 * i + i // 10) % 10


def _write(directory, name: str, records: list[bytes]) -> None:
  os.makedirs(directory, exist_ok=True)
  prediction_log.write_records(os.path.join(directory, name), records)


def _judge(tmp_path, canary_arm: dict, *, stable_requests=600, labels=None, t=None):
  logs = tmp_path / "logs"
  _write(logs, "stable.tfrecord", _records("production", T0, 10, requests=stable_requests))
  _write(logs, "canary.tfrecord", _records("canary", T0, 10, **canary_arm))
  window = canary_checks.read_window(
    str(logs), "digits", ("canary", "production"), int(T0 * 1e6), int((T0 + 10) * 1e6)
  )
  checks = canary_checks.judge(window["canary"], window["production"], t or Thresholds(), labels)
  return {c["name"]: c for c in checks}


def _verdicts(checks: dict) -> dict:
  return {name: c["verdict"] for name, c in checks.items()}


def test_a_good_candidate_passes_every_check(tmp_path):
  checks = _judge(tmp_path, dict(GOOD, classes=None))
  assert _verdicts(checks) == {
    "requests": "pass",
    "error_rate": "pass",
    "latency_p99_ratio": "pass",
    "prediction_divergence": "pass",
    "accuracy": "skipped",
  }
  assert checks["requests"]["measured"] == 200
  assert 0.5 < checks["latency_p99_ratio"]["measured"] < 1.5


@pytest.mark.parametrize(
  "canary_arm, failing",
  [
    ({"errors": 20}, "error_rate"),  # 10% errors against none
    ({"latency_us": 3000}, "latency_p99_ratio"),  # 3x slower
    ({"classes": lambda i: i % 2}, "prediction_divergence"),  # only classes 0 and 1
    ({"requests": 60}, "requests"),  # below min_requests=100
  ],
)
def test_a_bad_candidate_fails_the_right_check(tmp_path, canary_arm, failing):
  checks = _judge(tmp_path, {**GOOD, **canary_arm})
  failed = [name for name, c in checks.items() if c["verdict"] == "fail"]
  assert failed == [failing], checks
  assert checks[failing]["measured"] is not None
  if failing == "requests":  # nothing else can be judged on too little traffic (Flagger)
    assert {c["verdict"] for n, c in checks.items() if n != "requests"} == {"skipped"}


def test_accuracy_is_judged_on_feedback_labels(tmp_path):
  # Record i predicts _spread(i); the labels agree for stable's requests and are off by one
  # for the canary's: the canary is wrong on every labelled row.
  labels = {}
  for i in range(200):
    labels[(f"r-canary-{T0}-{i}", 0)] = (_spread(i) + 1) % 10
  for i in range(600):
    labels[(f"r-production-{T0}-{i}", 0)] = _spread(i)
  checks = _judge(tmp_path, GOOD, labels=labels)
  assert checks["accuracy"]["verdict"] == "fail"
  assert checks["accuracy"]["measured"] == pytest.approx(-1.0)
  good = {k: v for k, v in labels.items() if "production" in k[0]}
  good.update({(f"r-canary-{T0}-{i}", 0): _spread(i) for i in range(200)})
  assert _judge(tmp_path, GOOD, labels=good)["accuracy"]["verdict"] == "pass"


def test_the_measure_reads_the_servers_feedback_file_beside_the_logs(tmp_path):
  logs = tmp_path / "logs"
  _write(logs, "a.tfrecord", _records("production", T0, 10) + _records("canary", T0, 10))
  spec = canary.CanarySpec("digits", 2)
  measure = canary.log_measure(str(logs), spec)
  assert {c["name"]: c["verdict"] for c in measure(T0, T0 + 10)}["accuracy"] == "skipped"
  with open(logs / "feedback.jsonl", "w") as f:  # what POST /v1/models/digits/feedback appends
    for arm, shift in (("production", 0), ("canary", 3)):
      for i in range(200):
        label = (_spread(i) + shift) % 10
        f.write(json.dumps({"request_id": f"r-{arm}-{T0}-{i}", "label": label}) + "\n")
  checks = {c["name"]: c for c in measure(T0, T0 + 10)}
  assert checks["requests"]["measured"] == 200  # the JSONL file is not read as a log
  assert checks["accuracy"]["verdict"] == "fail" and checks["accuracy"]["measured"] == -1.0


def test_same_distribution_samples_do_not_diverge():
  """Chance differences between two samples of one class distribution (100 vs 900 rows, where
  the Jensen-Shannon distance alone is ~0.13) never fail the divergence check."""
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(10))
  t = Thresholds()
  for _ in range(200):
    a, b = (canary_checks.ArmWindow(classes=rng.choice(10, n, p=p).tolist()) for n in (100, 900))
    assert canary_checks._divergence(a, b, t)["verdict"] == "pass"


def test_the_window_keeps_only_split_primary_records_of_the_model(tmp_path):
  logs = tmp_path / "logs"
  inside = _records("canary", T0, 1, requests=10)
  before = _records("canary", T0 - 5, 1, requests=7, prefix="old")
  records = inside + before
  meta = RecordMetadata("x", int(T0 * 1e6) + 5, "digits", 2, "canary", "canary", role="shadow")
  records.append(prediction_log.make_record({"inputs": np.zeros((1, 4), np.float32)}, {}, meta))
  other = RecordMetadata("y", int(T0 * 1e6) + 5, "other", 2, "canary", "canary")
  records.append(prediction_log.make_record({"inputs": np.zeros((1, 4), np.float32)}, {}, other))
  unsplit = RecordMetadata("z", int(T0 * 1e6) + 5, "digits", 2, "canary", None)
  records.append(prediction_log.make_record({"inputs": np.zeros((1, 4), np.float32)}, {}, unsplit))
  _write(logs, "a.tfrecord", records)
  window = canary_checks.read_window(
    str(logs), "digits", ("canary",), int(T0 * 1e6), int((T0 + 1) * 1e6)
  )
  assert window["canary"].requests == 10 and window["canary"].errors == 0


class FakeClock:
  def __init__(self, on_sleep=None):
    self.now, self.on_sleep = T0, on_sleep

  def __call__(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    if self.on_sleep:
      self.on_sleep()
    self.now += seconds


class FakeRollout:
  def __init__(self):
    self.calls, self.records = [], []

  def point_canary(self, version):
    self.calls.append(("point_canary", version))

  def remove_canary(self):
    self.calls.append(("remove_canary",))

  def promote(self, version):
    self.calls.append(("promote", version))

  def audit(self, record):
    self.records.append(record)


TRAFFIC = {
  "models": {
    "digits": {"mirror": {"label": "shadow", "percent": 5}, "split": {"key": "x-session"}},
    "other": {"split": {"arms": [{"label": "a", "weight": 100}]}},
  }
}


def _run_loop(tmp_path, per_interval: list[dict], **spec_fields):
  """Runs the controller on a fake clock (interval 60 s) over logs holding, for interval k,
  canary records `per_interval[k]`; returns (outcome, rollout, traffic snapshots per sleep)."""
  logs = tmp_path / "logs"
  for k, arm in enumerate(per_interval):
    start = T0 + 60 * k
    _write(
      logs,
      f"{k:03d}.tfrecord",
      _records("production", start, 60, requests=400) + _records("canary", start, 60, **arm),
    )
  traffic = tmp_path / "traffic.json"
  traffic.write_text(json.dumps(TRAFFIC))
  snapshots = []
  clock = FakeClock(lambda: snapshots.append(json.loads(traffic.read_text())))
  spec = canary.CanarySpec("digits", 2, interval_s=60, **spec_fields)
  fake = FakeRollout()
  controller = canary.Controller(
    spec, fake, str(traffic), canary.log_measure(str(logs), spec), clock=clock, sleep=clock.sleep
  )
  return controller.run(), fake, snapshots, clock


def _weights(snapshots):
  return [canary_traffic.canary_weight(s, "digits", "canary") for s in snapshots]


def test_a_good_candidate_is_promoted_after_max_over_step_intervals(tmp_path):
  outcome, fake, snapshots, _ = _run_loop(tmp_path, [GOOD] * 8)
  assert outcome.result == "promoted" and len(outcome.intervals) == 50 // 10
  assert fake.calls == [("point_canary", 2), ("promote", 2), ("remove_canary",)]
  assert outcome.weights == [0, 10, 20, 30, 40, 50, 0]
  # What the server read before the candidate loaded, during each interval, then before the
  # canary label goes.
  assert _weights(snapshots) == [0, 10, 20, 30, 40, 50, 0]
  for snapshot in snapshots:
    assert snapshot["models"]["other"] == TRAFFIC["models"]["other"]
    assert snapshot["models"]["digits"]["mirror"] == TRAFFIC["models"]["digits"]["mirror"]
    assert snapshot["models"]["digits"]["split"]["key"] == "x-session"
  assert snapshots[-1]["models"]["digits"]["split"]["arms"] == [
    {"label": "production", "weight": 100}
  ]
  decisions = [r["action"] for r in fake.records]
  assert decisions == ["start", "advance", "advance", "advance", "advance", "promote", "promoted"]
  measured = fake.records[1]["checks"]
  assert {c["name"] for c in measured} >= {"error_rate", "latency_p99_ratio"}
  assert all(c["measured"] is not None for c in measured if c["verdict"] != "skipped")


def test_a_bad_candidate_is_rolled_back_within_threshold_intervals(tmp_path):
  outcome, fake, snapshots, clock = _run_loop(tmp_path, [{"errors": 40}] * 8, threshold=3)
  assert outcome.result == "rolled_back" and len(outcome.intervals) == 3
  assert clock.now - T0 <= 3 * 60 + 2 * outcome.spec.settle_s
  assert fake.calls == [("point_canary", 2), ("remove_canary",)]
  assert _weights(snapshots) == [0, 10, 10, 10, 0]  # a failed interval holds the weight
  assert [i.failed_checks for i in outcome.intervals] == [1, 2, 3]
  assert all(
    next(c for c in i.checks if c["name"] == "error_rate")["verdict"] == "fail"
    for i in outcome.intervals
  )
  assert fake.records[-1]["action"] == "rolled_back"


def test_failed_checks_accumulate_and_hold_the_weight(tmp_path):
  few = {"requests": 20}
  plan = [GOOD, few, GOOD, few, GOOD, GOOD, GOOD, GOOD]
  outcome, *_ = _run_loop(tmp_path, plan, threshold=3, step_weight=25)
  # 25 -> 50 -> (hold) -> promote at 50 on the next pass; the two failures did not reset.
  assert [i.action for i in outcome.intervals] == ["advance", "hold", "promote"]
  assert outcome.result == "promoted" and outcome.intervals[-1].failed_checks == 1
  outcome, *_ = _run_loop(tmp_path / "b", [GOOD, few, GOOD, few] * 2, threshold=2, step_weight=10)
  assert outcome.result == "rolled_back" and len(outcome.intervals) == 4


def test_an_undecided_or_interrupted_canary_is_rolled_back(tmp_path):
  outcome, fake, snapshots, _ = _run_loop(tmp_path, [GOOD] * 8, max_intervals=2)
  assert outcome.result == "rolled_back" and "max_intervals" in outcome.reason
  assert fake.calls[-1] == ("remove_canary",) and _weights(snapshots)[-1] == 0
  fake = FakeRollout()
  traffic = tmp_path / "t.json"

  def broken_measure(start, end):
    raise KeyboardInterrupt

  clock = FakeClock()
  arms = [{"label": "production", "weight": 50}, {"label": "b", "weight": 50}]
  traffic.write_text(json.dumps({"models": {"digits": {"split": {"arms": arms}}}}))
  ab_test = traffic.read_text()
  spec = canary.CanarySpec("digits", 2)
  controller = canary.Controller(spec, fake, str(traffic), broken_measure, clock=clock)
  with pytest.raises(canary_traffic.TrafficFileError, match=r"over \['b'\] too"):
    controller.run()
  assert fake.calls == [] and traffic.read_text() == ab_test  # an A/B test is never overwritten
  traffic.unlink()
  controller = canary.Controller(
    canary.CanarySpec("digits", 2),
    fake,
    str(traffic),
    broken_measure,
    clock=clock,
    sleep=clock.sleep,
  )
  with pytest.raises(KeyboardInterrupt):
    controller.run()
  assert fake.calls == [("point_canary", 2), ("remove_canary",)]
  assert canary_traffic.canary_weight(json.loads(traffic.read_text()), "digits", "canary") == 0


# --- End to end: the real registry and a real server -------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
  previous = os.environ.get("MLFLOW_TRACKING_URI")
  os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}"
  yield
  if previous is None:
    del os.environ["MLFLOW_TRACKING_URI"]
  else:
    os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
  """digits versions 1, 2 (tiny models with the digits signature, uniform answers), 3 (errors on
  every digits request) registered and gated, 4 registered without a gate record; production=1
  in MLflow and in the model config; a server on that config, logging every request, splitting
  by the traffic file the canary writes (polled every 0.1 s). The server starts while the
  MLflow store is created (both take seconds)."""
  root = tmp_path_factory.mktemp("canary")
  base = root / "models" / "digits"
  base.mkdir(parents=True)
  shadow_models.export_sleeping(str(base / "1"), sleep_us=0)
  shadow_models.export_erroring(str(base / "3"))
  for version in (2, 4):
    shutil.copytree(base / "1", base / str(version))
  for version in range(1, 5):  # where promote refreshes each version's model card
    (base / str(version) / "assets.extra").mkdir(exist_ok=True)
  logs = root / "logs"
  logs.mkdir()
  config = root / "models.config"
  entry = (
    f"model_config_list {{ config {{ name: 'digits' base_path: '{base}' "
    f"model_platform: 'tensorflow' logging_config {{ log_collector_config "
    f"{{ filename_prefix: '{logs}/predict' }} sampling_config {{ sampling_rate: 1.0 }} }} }} }}"
  )
  config.write_text(
    registry_serving.with_label(entry, str(config), "digits", str(base), "production", 1)
  )
  traffic = root / "traffic.json"
  traffic.write_text('{"models": {}}')
  args = [
    *model_server.QUICK_ARGS,
    f"--model_config_file={config}",
    f"--traffic_config_file={traffic}",
    "--traffic_config_file_poll_wait_seconds=0.1",
  ]
  server = model_server.Server(args, str(root / "server.log"), base=str(base))
  client = registry_store.client()
  client.create_registered_model("digits", tags={"export_base": str(base)})
  for version in (1, 2, 3, 4):
    tags = {"registry.state": "ready"}
    if version != 4:
      tags["gate.verdict"] = "pass"
    client.create_model_version("digits", str(base / str(version)), tags=tags)
  client.set_registered_model_alias("digits", "production", "1")
  with server:
    server.paths = {
      "config": str(config),
      "traffic": str(traffic),
      "logs": str(logs),
      "base": str(base),
      "out": str(root / "report"),
    }
    yield server


class Load:
  """Two client threads sending REST Predicts (a new x-user-id and x-request-id each) until
  stopped; `failed` holds the request ids of non-200 answers."""

  def __init__(self, server, tag: str):
    self.url = f"{server.url}/v1/models/digits:predict"
    self.body = json.dumps({"instances": model_server.digits_pixels(2).tolist()}).encode()
    self.tag = tag
    self.sent, self.failed = [0, 0], []
    self.stop = threading.Event()
    self.threads = [threading.Thread(target=self._send, args=(t,)) for t in range(2)]

  def _send(self, thread: int) -> None:
    while not self.stop.is_set():
      self.sent[thread] += 1
      request_id = f"{self.tag}-{thread}-{self.sent[thread]}"
      headers = {"x-user-id": request_id, "x-request-id": request_id}
      request = urllib.request.Request(self.url, self.body, headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=30):
          pass
      except urllib.error.HTTPError:
        self.failed.append(request_id)

  def __enter__(self):
    for thread in self.threads:
      thread.start()
    return self

  def __exit__(self, *exc):
    self.stop.set()
    for thread in self.threads:
      thread.join(timeout=60)


def _logged_arms(logs_dir: str) -> dict[str, tuple[str, int]]:
  """request id -> (arm, status code) of every primary record in the logs."""
  from tensorflow_serving.apis import prediction_log_pb2

  found = {}
  for path in prediction_log.log_files(logs_dir):
    for payload in prediction_log.iter_records(path):
      meta = prediction_log.decode_metadata(prediction_log_pb2.PredictionLog.FromString(payload))
      if meta.role == "primary":
        found[meta.request_id] = (meta.arm or "", meta.status_code)
  return found


def _canary_cli(server, candidate: int, *extra: str) -> int:
  p = server.paths
  return rollout.main(
    [
      "rollout",
      "canary",
      "--name=digits",
      f"--candidate={candidate}",
      f"--logs={p['logs']}",
      f"--traffic_config_file={p['traffic']}",
      f"--model_config_file={p['config']}",
      f"--server=127.0.0.1:{server.grpc_port}",
      f"--out={p['out']}",
      "--step_weight=25",
      "--max_weight=50",
      "--interval_s=1",
      "--threshold=2",
      "--min_requests=10",
      "--settle_s=0.3",
      "--max_intervals=6",
      # Two arms of one tiny model on 2 shared cores: p99 over ~100 requests is noise, so the
      # latency check is judged in the synthetic tests above, not here.
      "--max_latency_ratio=50",
      *extra,
    ]
  )


def _state(server) -> tuple:
  client = registry_store.client()
  labels = registry_serving.labels(
    registry_serving.read_text(server.paths["config"]), server.paths["config"], "digits"
  )
  with open(server.paths["traffic"]) as f:
    traffic = json.load(f)
  return (
    registry_store.alias_version(client, "digits", "production"),
    registry_store.alias_version(client, "digits", "canary"),
    labels,
    canary_traffic.canary_weight(traffic, "digits", "canary"),
  )


def _canary_events(server) -> list[dict]:
  return [r for r in registry_audit.read(server.paths["base"]) if r.get("event") == "canary"]


def test_bad_input_moves_nothing(served, capsys):
  before = _state(served)
  cases = {
    ("--candidate=9",): "has no version 9",
    ("--candidate=4",): "no passing gate record",
    ("--candidate=1",): "already digits@production",
    ("--candidate=2", "--max_weight=120"): "--max_weight=120",
    ("--candidate=2", "--logs=/nonexistent"): "--logs=/nonexistent is not a directory",
  }
  for args, message in cases.items():
    candidate = int(args[0].split("=")[1])
    assert _canary_cli(served, candidate, *args[1:]) == 1, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
  assert (
    rollout.main(
      [
        "rollout",
        "canary",
        "--name=nope",
        "--candidate=2",
        "--logs=/tmp",
        "--traffic_config_file=t",
        "--model_config_file=m",
      ]
    )
    == 1
  )
  assert "not a registered model" in capsys.readouterr().err
  assert _state(served) == before and not _canary_events(served)


def test_an_erroring_candidate_is_rolled_back_and_a_good_one_promoted(served, capsys):
  with Load(served, "bad") as load:
    assert _canary_cli(served, 3) == 2
  events = _canary_events(served)
  assert [e["action"] for e in events] == ["start", "hold", "rollback", "rolled_back"]
  assert all(
    next(c for c in e["checks"] if c["name"] == "error_rate")["verdict"] == "fail"
    for e in events[1:3]
  )
  assert _state(served) == (1, None, {"production": 1}, 0)
  arms = _logged_arms(served.paths["logs"])
  # Every failed request was one the split sent to the erroring canary; stable never failed.
  assert load.failed and {arms[r] for r in load.failed} == {("canary", 3)}

  with Load(served, "good") as load:
    assert _canary_cli(served, 2) == 0
  events = _canary_events(served)[4:]
  assert [e["action"] for e in events] == ["start", "advance", "promote", "promoted"]
  assert _state(served) == (2, None, {"production": 2}, 0)
  arms = _logged_arms(served.paths["logs"])
  assert load.failed == [] and sum(load.sent) > 0
  assert any(r.startswith("good") and arm == ("canary", 0) for r, arm in arms.items())
  grpc = f"127.0.0.1:{served.grpc_port}"
  assert registry_serving.served_version(grpc, "digits", "production") == 2
  with open(os.path.join(served.paths["out"], "canary.md")) as f:
    report = f.read()
  assert "PROMOTED" in report and "| error_rate |" in report
  assert "promoted after 2 intervals" in capsys.readouterr().out
