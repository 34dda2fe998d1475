"""The canary controller (mlops/canary*.py): the checks on synthetic prediction logs (a good
candidate passes; high error rate, slow, divergent, too little traffic and wrong labels each
fail their own check), and the loop on a fake clock and registry (promotion after
max_weight/step_weight intervals, rollback after `threshold`, the traffic file at every step,
other entries kept). The real registry and server: tests/test_canary_server.py."""

import json
import os
import zlib

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving", reason="logs are TF Serving protos (make install)")

from mlops import (
  canary,
  canary_checks,
  canary_traffic,
  prediction_log,
)
from mlops.canary_checks import Thresholds
from mlops.prediction_log import RecordMetadata

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


def test_a_classify_counts_with_its_top_scoring_class(tmp_path):
  logs = tmp_path / "logs"
  meta = RecordMetadata("c", int(T0 * 1e6) + 5, "digits", 2, "canary", "canary", rpc="Classify")
  labels = np.array([[b"0", b"1", b"2"]] * 2, object)
  scores = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], np.float32)
  examples = np.array([b"", b""], object)  # Empty tf.Examples: the window reads outputs only.
  outputs = {"classes": labels, "scores": scores}
  _write(logs, "a.tfrecord", [prediction_log.make_record({"inputs": examples}, outputs, meta)])
  window = canary_checks.read_window(
    str(logs), "digits", ("canary",), int(T0 * 1e6), int((T0 + 1) * 1e6)
  )
  assert window["canary"].requests == 1 and window["canary"].classes == [2, 0]


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


def test_helpfull_lists_every_flag_with_flaggers_defaults(capsys):
  from mlops import rollout

  assert rollout.main(["rollout", "canary", "--helpfull"]) == 0
  text = capsys.readouterr().out
  defaults = {"step_weight": 10, "max_weight": 50, "interval_s": 60.0, "threshold": 5}
  for flag, default in {**defaults, "min_requests": 100}.items():
    assert f"--{flag}:" in text and f"(default: '{default}')" in text, flag
  for flag in ("name", "candidate", "logs", "traffic_config_file", "model_config_file", "server"):
    assert f"--{flag}:" in text
