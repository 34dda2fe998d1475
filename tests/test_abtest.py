"""The A/B test report on constructed prediction logs: SRM on skewed vs fair splits, a
difference CI that covers a known effect, the always-valid test on A/A streams, and bad input."""

import csv
import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving", reason="logs are TF Serving protos (make install)")

from mlops import abtest, abtest_stats, prediction_log
from mlops.prediction_log import RecordMetadata


def _write_ab_logs(directory, *, counts, accuracy, seed, latency_ms=None, errors=None):
  """One single-row record per request; arm `a` = control. Labels go to feedback.csv beside the
  logs; a request is correct with probability accuracy[arm]. Returns (logs dir, feedback path)."""
  rng = np.random.default_rng(seed)
  logs = os.path.join(directory, "logs")
  os.makedirs(logs)
  records, labels = [], []
  arms = [arm for arm, n in counts.items() for _ in range(n)]
  rng.shuffle(arms)
  latency_ms = latency_ms or {}
  for i, arm in enumerate(arms):
    label = int(rng.integers(10))
    correct = rng.random() < accuracy[arm]
    predicted = label if correct else (label + 1) % 10
    status = 13 if errors and rng.random() < errors.get(arm, 0) else 0
    meta = RecordMetadata(
      request_id=f"r{i}",
      time_us=1_700_000_000_000_000 + i * 1000,
      model_name="digits",
      version=1 if arm == "a" else 2,
      version_label=arm,
      arm=arm,
      latency_us=int(rng.gamma(4, 250 * latency_ms.get(arm, 1.0))),
      status_code=status,
    )
    outputs = {} if status else {"classes": np.array([predicted], np.int32)}
    records.append(prediction_log.make_record({"x": np.zeros((1, 2), np.float32)}, outputs, meta))
    labels.append((f"r{i}", label))
  # A shadow copy and a request that bypassed the split: both must be left out.
  x, classes = {"x": np.zeros((1, 2), np.float32)}, {"classes": np.array([0], np.int32)}
  shadow = dataclasses.replace(meta, role="shadow", status_code=0)
  bypass = dataclasses.replace(meta, request_id="explicit", arm=None, status_code=0)
  records += [prediction_log.make_record(x, classes, m) for m in (shadow, bypass)]
  half = len(records) // 2
  prediction_log.write_records(os.path.join(logs, "log-0"), records[:half])
  prediction_log.write_records(os.path.join(logs, "log-1"), records[half:])
  feedback = os.path.join(directory, "feedback.csv")
  with open(feedback, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["request_id", "label"])
    writer.writerows(labels)
  return logs, feedback


@pytest.fixture(scope="module")
def effect_logs(tmp_path_factory):
  """A fair 50/50 split with a known accuracy effect of +0.08 (0.82 -> 0.90) and a slower b."""
  return _write_ab_logs(
    str(tmp_path_factory.mktemp("effect")),
    counts={"a": 1500, "b": 1500},
    accuracy={"a": 0.82, "b": 0.90},
    latency_ms={"a": 1.0, "b": 1.5},
    errors={"b": 0.02},
    seed=1,
  )


def test_fair_split_report_covers_the_known_effect(effect_logs, tmp_path, capsys):
  logs, feedback = effect_logs
  out = str(tmp_path / "report")
  argv = ["abtest", f"--logs={logs}", f"--feedback={feedback}", "--weights=a=50,b=50"]
  assert abtest.main([*argv, f"--out={out}", "--sequential", "--mde=0.08"]) == 0
  record = json.loads(pathlib.Path(out, "abtest.json").read_text())
  assert not record["srm"]["flagged"] and record["srm"]["p_value"] > 0.001
  assert sum(record["srm"]["observed"].values()) == 3000  # shadow copy left out
  assert (record["read"]["shadow_rows"], record["read"]["bypassed_rows"]) == (1, 1)
  (b,) = record["comparisons"]
  true_difference = 0.90 - 0.82
  assert b["metric"]["ci_low"] < true_difference < b["metric"]["ci_high"]
  assert b["metric"]["ci_low"] > 0 and b["metric"]["p_value"] < 0.001
  assert b["latency"]["p50_ms"]["b"] > b["latency"]["p50_ms"]["a"]
  assert b["latency"]["p_value"] < 0.001
  assert record["arms"]["b"]["errors"] > 0 and record["arms"]["a"]["errors"] == 0
  assert b["sequential"]["flagged_at"] is not None  # a +8 points effect is found early
  assert b["sequential"]["ci"][0] < true_difference < b["sequential"]["ci"][1]
  # 1500 labelled rows per arm are more than detecting 0.08 needs (~400): none are missing.
  assert b["plan"]["more_requests"] == 0
  names = sorted(os.listdir(out))
  assert names == ["abtest.json", "abtest.md", "abtest.png", "sequential_b.png"]
  text = pathlib.Path(out, "abtest.md").read_text()
  assert "no sample ratio mismatch" in text and "![abtest.png](abtest.png)" in text
  assert "SRM: ok" in capsys.readouterr().out


def test_skewed_split_is_flagged(tmp_path):
  # 50/50 configured, 53/47 logged over 4000 requests: chi-square p ~ 1e-4.
  logs, _ = _write_ab_logs(
    str(tmp_path), counts={"a": 2120, "b": 1880}, accuracy={"a": 0.9, "b": 0.9}, seed=2
  )
  result = abtest.analyze(logs, weights={"a": 50, "b": 50})
  assert result.srm.flagged and result.srm.p_value < 0.001
  assert result.srm.observed == {"a": 2120, "b": 1880}
  # The same counts are what a 53/47 split should give: not flagged against those weights.
  assert not abtest.analyze(logs, weights={"a": 53, "b": 47}).srm.flagged


def test_weights_from_the_servers_traffic_config(tmp_path):
  path = tmp_path / "traffic.json"
  split = {"key": "x-user-id", "arms": [{"label": "a", "weight": 53}, {"label": "b", "weight": 47}]}
  path.write_text(json.dumps({"models": {"digits": {"split": split}}}))
  assert abtest.weights_from_traffic_config(str(path), None) == {"a": 53.0, "b": 47.0}
  with pytest.raises(abtest.AbtestError, match="give --model= one of"):
    abtest.weights_from_traffic_config(str(path), "other")


def test_sample_size_plan_asks_for_more_requests_when_short(effect_logs):
  logs, feedback = effect_logs
  result = abtest.analyze(logs, feedback=feedback, weights={"a": 50, "b": 50}, mde=0.01)
  plan = result.comparisons[0].plan
  # 0.82 vs 0.83 at alpha 0.05, power 0.8 needs ~23,000 labelled rows per arm.
  assert 20_000 < plan["need"]["a"] < 26_000
  assert plan["more_requests"] > 2 * (plan["need"]["a"] - 1500)


def test_always_valid_test_does_not_flag_aa_streams_where_peeking_would():
  rng = np.random.default_rng(3)
  runs, n = 200, 2000
  flagged = naive_flagged = 0
  for _ in range(runs):
    treatment = rng.random(n) < 0.5
    values = (rng.random(n) < 0.85).astype(float)
    path = abtest_stats.always_valid(values, treatment, tau=0.02)
    flagged += path.flagged_at is not None
    assert np.all(np.diff(path.p_value) <= 0)  # an always-valid p-value never rises
    # Peeking at a fixed-horizon z-test every 100 rows: what the sequential mode prevents.
    for k in range(100, n + 1, 100):
      t, v = treatment[:k], values[:k]
      d = abtest_stats.proportion_difference(v[~t].sum(), (~t).sum(), v[t].sum(), t.sum())
      if d.p_value < 0.05:
        naive_flagged += 1
        break
  assert flagged / runs <= 0.05
  assert naive_flagged / runs > 0.15


def test_bad_input_is_one_error_line(tmp_path, effect_logs, capsys):
  logs, feedback = effect_logs
  empty = tmp_path / "empty"
  empty.mkdir()
  prediction_log.write_records(str(tmp_path / "empty" / "log-0"), [])
  cases = {
    f"--logs={tmp_path / 'missing'}": "is not a directory",
    f"--logs={empty}": "holds no complete record",
    "--metric=f1": "--metric=f1 is unknown",
    "--weights=a=50,b": "--weights=a=50,b: bad item 'b'",
    "--weights=a=50,c=50": "lacks the logged arms ['b']",
    "--weights=a=-5,b=50": "bad item 'a=-5'",
    "--control=z": "--control=z is not an arm",
    f"--traffic_config={tmp_path / 'none.json'}": "is not a readable traffic config",
  }
  for flag, message in cases.items():
    argv = ["abtest", f"--logs={logs}", f"--feedback={feedback}", flag, f"--out={tmp_path}/o"]
    assert abtest.main(argv) == 1, flag
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (flag, err)
  assert not os.path.exists(tmp_path / "o")  # nothing written on bad input
