"""The traffic policy (--traffic_config_file): sticky split assignment (unit), config checks
(unit and on a live server, where a refused file keeps the previous policy), the split over gRPC
and REST, and shadows that error or sleep without touching the primary. One server for the
module: digits as stable=1 and canary=2, an erroring shadow (3) and a sleeping one (4)."""

import json
import os
import statistics
import time
import urllib.request

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")
grpc = pytest.importorskip("grpc", reason="the server needs grpcio (make install)")

from mlops import prediction_log  # noqa: E402
from serving.server import traffic  # noqa: E402
from tests.helpers import model_server, shadow_models  # noqa: E402
from tests.helpers.model_server import predict_request  # noqa: E402

LABELS = {"stable": 1, "canary": 2, "broken": 3, "slow": 4}
Z_999 = 3.29  # Two-sided 99.9% normal quantile.


def _split(weights: dict[str, float], key: str = "x-user-id") -> dict:
  return {"key": key, "arms": [{"label": k, "weight": w} for k, w in weights.items()]}


def _policy(config: dict) -> traffic.ModelPolicy:
  return traffic.parse(json.dumps(config), {"digits": set(LABELS)}, "test")["digits"]


def _assign(policy: traffic.SplitPolicy, keys: list[str]) -> list[str]:
  arms = []
  for key in keys:
    seen = {policy.choose({"x-user-id": key}) for _ in range(3)}
    assert len(seen) == 1, f"key {key} got arms {seen}"
    arms.append(seen.pop())
  return arms


def test_split_is_sticky_proportional_and_moves_only_the_changed_share():
  keys = [f"user-{i}" for i in range(10_000)]
  weights = {"stable": 70, "canary": 10, "slow": 20}
  before = _assign(_policy({"models": {"digits": {"split": _split(weights)}}}).split, keys)
  n = len(keys)
  for arm, weight in weights.items():
    p = weight / 100
    half_width = Z_999 * (p * (1 - p) / n) ** 0.5
    assert abs(before.count(arm) / n - p) < half_width, (arm, before.count(arm))
  moved = {"stable": 60, "canary": 20, "slow": 20}  # canary 10 -> 20, taken from stable
  after = _assign(_policy({"models": {"digits": {"split": _split(moved)}}}).split, keys)
  changes = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
  assert changes and set(changes) == {("stable", "canary")}
  p = 0.10
  assert abs(len(changes) / n - p) < Z_999 * (p * (1 - p) / n) ** 0.5
  # No key leaves canary or slow.
  assert all(b == a for a, b in zip(before, after, strict=True) if a in ("canary", "slow"))


def test_hash_is_growthbook_fnv1a_twice():
  # FNV-1a 32-bit reference values (the published test vectors).
  assert traffic.fnv1a32(b"") == 0x811C9DC5
  assert traffic.fnv1a32(b"a") == 0xE40C292C
  assert traffic.fnv1a32(b"foobar") == 0xBF9CF968
  assert traffic.bucket("s", "k") == traffic.fnv1a32(str(traffic.fnv1a32(b"sk")).encode()) % 10000


BAD_CONFIGS = {
  "weights not summing to 100": {"split": _split({"stable": 60, "canary": 30})},
  "unknown label": {"split": _split({"stable": 50, "nope": 50})},
  "mirror of a missing label": {"mirror": {"label": "missing", "percent": 10}},
  "negative percentage": {"mirror": {"label": "slow", "percent": -5}},
  "negative weight": {"split": _split({"stable": 110, "canary": -10})},
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_are_refused_naming_the_value(case):
  with pytest.raises(traffic.TrafficConfigError) as error:
    _policy({"models": {"digits": BAD_CONFIGS[case]}})
  assert "test, model 'digits'" in str(error.value)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return model_server.digits_export(tmp_path_factory)


@pytest.fixture(scope="module")
def served(digits, tmp_path_factory):
  root = tmp_path_factory.mktemp("traffic")
  base = root / "models" / "digits"
  for version in (1, 2):
    model_server.copy_version(digits[1], str(base), version)
  shadow_models.export_erroring(str(base / "3"))
  shadow_models.export_sleeping(str(base / "4"))
  labels = " ".join(f"version_labels {{ key: '{k}' value: {v} }}" for k, v in LABELS.items())
  config = root / "models.config"
  logs = root / "logs"
  config.write_text(
    f"model_config_list {{ config {{ name: 'digits' base_path: '{base}' "
    f"model_version_policy {{ all {{}} }} {labels} logging_config {{ log_collector_config "
    f"{{ filename_prefix: '{logs}/predict' }} sampling_config {{ sampling_rate: 1.0 }} }} }} }}"
  )
  traffic_file = root / "traffic.json"
  traffic_file.write_text(json.dumps({"models": {"digits": {"split": _split(HALF)}}}))
  args = [
    *model_server.QUICK_ARGS,
    f"--model_config_file={config}",
    f"--traffic_config_file={traffic_file}",
    "--traffic_config_file_poll_wait_seconds=0.1",
    "--model_config_file_poll_wait_seconds=1",
    "--shadow_workers=1",
    "--shadow_queue_size=4",
  ]
  with model_server.Server(args, str(root / "server.log"), base=str(base)) as server:
    server.traffic_file = traffic_file
    server.model_config = config
    server.logs = str(logs)
    yield server


HALF = {"stable": 50, "canary": 50}


def _loads(server, result: str) -> float:
  prefix = f'serving_traffic_config_loads_total{{result="{result}"}} '
  lines = [line for line in server.metrics_text().splitlines() if line.startswith(prefix)]
  return float(lines[0].split()[-1]) if lines else 0.0


def _write_policy(server, text: str, result: str = "applied") -> None:
  count = _loads(server, result)
  staging = server.traffic_file.with_suffix(".staging")
  staging.write_text(text)
  os.replace(staging, server.traffic_file)  # The watcher never reads half a file.
  model_server.wait_for(lambda: _loads(server, result) > count, 30, f"traffic config {result}")


def _predict(server, user: str | None = None, **spec):
  metadata = [("x-user-id", user)] if user else []
  response, call = server.predict_stub.Predict.with_call(
    predict_request(model_server.digits_pixels(1), **spec), metadata=metadata, timeout=30
  )
  return response, dict(call.trailing_metadata()).get("x-arm")


def test_split_over_grpc_and_rest_is_sticky_and_names_version_and_arm(served):
  split = _policy({"models": {"digits": {"split": _split(HALF)}}}).split
  for user in [f"u{i}" for i in range(12)]:
    response, arm = _predict(served, user)
    assert arm == split.choose({"x-user-id": user})
    assert response.model_spec.version.value == LABELS[arm]
    assert _predict(served, user)[1] == arm  # Sticky.
    request = urllib.request.Request(
      served.url + "/v1/models/digits:predict",
      json.dumps({"instances": model_server.digits_pixels(1).tolist()}).encode(),
      {"X-User-Id": user},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
      assert answer.headers["x-arm"] == arm
  response, arm = _predict(served, "u1", version=2)  # Explicit: no split.
  assert arm is None and response.model_spec.version.value == 2
  assert _predict(served, "u1", version_label="stable")[1] is None
  assert {_predict(served)[1] for _ in range(30)} == {"stable", "canary"}  # Random per request.


def test_bad_files_are_refused_and_the_previous_policy_stays(served):
  _write_policy(served, json.dumps({"models": {"digits": {"split": _split({"canary": 100})}}}))
  for case, entry in BAD_CONFIGS.items():
    _write_policy(served, json.dumps({"models": {"digits": entry}}), "refused")
    assert _predict(served, "anyone")[1] == "canary", case
  _write_policy(served, "{not json", "refused")
  assert _predict(served, "anyone")[1] == "canary"
  errors = [line for line in served.log_text().splitlines() if "Not applying" in line]
  assert len(errors) == len(BAD_CONFIGS) + 1
  _write_policy(served, json.dumps({"models": {"digits": {"split": _split(HALF)}}}))


def test_a_refused_file_applies_once_its_label_reaches_the_model_config(served):
  late = {"models": {"digits": {"split": _split({"stable": 50, "late": 50})}}}
  _write_policy(served, json.dumps(late), "refused")
  applied = _loads(served, "applied")
  text = served.model_config.read_text()
  labelled = text.replace(
    "version_labels", "version_labels { key: 'late' value: 2 } version_labels", 1
  )
  try:
    served.model_config.write_text(labelled)  # The traffic file is not touched again.
    model_server.wait_for(lambda: _loads(served, "applied") > applied, 30, "the retry applied")
    assert {_predict(served)[1] for _ in range(20)} == {"stable", "late"}
  finally:
    _write_policy(served, json.dumps({"models": {"digits": {"split": _split(HALF)}}}))
    served.model_config.write_text(text)


def _primary_latencies(server, prefix: str, count: int = 40) -> list[float]:
  latencies = []
  for i in range(count):
    start = time.perf_counter()
    server.predict_stub.Predict(
      predict_request(model_server.digits_pixels(1), version_label="stable"),
      metadata=[("x-request-id", f"{prefix}-{i}")],
      timeout=30,
    )
    latencies.append(time.perf_counter() - start)
  return latencies


def test_shadows_that_error_or_sleep_never_touch_the_primary(served):
  def mirror(label):
    # No shadow: a 0% mirror (a text unlike the previous file's, so it is applied again).
    policy = {
      "split": _split(HALF),
      "mirror": {"label": label or "slow", "percent": 100 if label else 0},
    }
    _write_policy(served, json.dumps({"models": {"digits": policy}}))

  p50 = {}
  for label in (None, "broken", "slow", None):
    mirror(label)
    _primary_latencies(served, f"warm-{label}", 5)  # Compile and settle.
    p50[label] = min(p50.get(label, 1e9), statistics.median(_primary_latencies(served, label)))
  # No failed primary (every call above raised otherwise); a synchronous 200 ms shadow would
  # multiply the primary's ~2 ms median by 100.
  assert p50["slow"] < 3 * p50[None] and p50["broken"] < 3 * p50[None], p50
  metrics = served.metrics_text()
  assert 'serving_shadow_requests_total{model="digits",outcome="error"}' in metrics
  assert 'serving_shadow_requests_total{model="digits",outcome="dropped"}' in metrics
  assert 'serving_shadow_requests_total{model="digits",outcome="ok"}' in metrics

  def shadows_logged():
    logs = prediction_log.read_logs(served.logs)
    return logs if (logs.role == "shadow").any() and logs.error_records else None

  logs = model_server.wait_for(shadows_logged, 30, "shadow records")
  shadow_ids = set(logs.request_id[logs.role == "shadow"])
  assert shadow_ids and all(i.startswith("slow-") or i.startswith("warm-slow") for i in shadow_ids)
  assert shadow_ids <= set(logs.request_id[logs.role == "primary"])
  assert set(logs.version[logs.role == "shadow"]) == {4}
  assert np.all(logs.role[np.isin(logs.request_id, list(shadow_ids))] != "")


def test_a_classify_is_mirrored_and_both_results_logged(served):
  from tensorflow_serving.apis import classification_pb2

  from tests.helpers.tf_examples import example, labels_and_scores

  policy = {"split": _split(HALF), "mirror": {"label": "canary", "percent": 100}}
  _write_policy(served, json.dumps({"models": {"digits": policy}}))
  pixels = model_server.digits_pixels(2)
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name, request.model_spec.version_label = "digits", "stable"
  request.model_spec.signature_name = "classify"
  request.input.example_list.examples.extend(example(inputs=row) for row in pixels)
  response = served.predict_stub.Classify(
    request, metadata=[("x-request-id", "mirrored-classify")], timeout=30
  )

  def both_logged():
    logs = prediction_log.read_logs(served.logs, rpc="Classify")
    mine = logs.select(logs.request_id == "mirrored-classify")
    return mine if set(mine.role) == {"primary", "shadow"} else None

  mine = model_server.wait_for(both_logged, 30, "the Classify and its shadow")
  primary, shadow = mine.select(mine.role == "primary"), mine.select(mine.role == "shadow")
  assert set(primary.version) == {1} and set(shadow.version) == {2}
  np.testing.assert_array_equal(shadow.inputs["inputs"], pixels)  # The same Examples.
  scores = labels_and_scores(response.result)[1]
  np.testing.assert_allclose(shadow.outputs["scores"], scores, rtol=1e-5)  # v2 = v1's weights.


def test_a_bad_file_at_start_is_one_error_line_and_exit_1(tmp_path):
  import subprocess
  import sys

  base = tmp_path / "models" / "tiny"  # Never loaded: the file is checked first.
  base.mkdir(parents=True)
  bad = tmp_path / "traffic.json"
  bad.write_text(json.dumps({"models": {"tiny": {"split": _split({"stable": 100})}}}))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "serving.server",
      "--port=0",
      "--model_name=tiny",
      f"--model_base_path={base}",
      f"--traffic_config_file={bad}",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    env=model_server.SERVER_ENV,
    cwd=model_server.REPO,
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "label 'stable' is not a version label" in errors[0], proc.stderr
