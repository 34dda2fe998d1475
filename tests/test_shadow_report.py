"""The shadow report on a constructed log: pairs primary and shadow rows by request id (not by
position or file), exact agreement rate, output differences, latency delta, shadow errors."""

import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving", reason="logs are TF Serving protos (make install)")

from mlops import prediction_log, shadow_report
from mlops.prediction_log import RecordMetadata

MIRRORED, NOT_MIRRORED, DISAGREE, SHADOW_ERRORS = 150, 50, 12, 5


def _record(request_id, role, classes, probabilities, *, status=0, latency_us=1000):
  meta = RecordMetadata(
    request_id=request_id,
    time_us=1_700_000_000_000_000,
    model_name="digits",
    version=1 if role == "primary" else 2,
    version_label="stable" if role == "primary" else "candidate",
    arm=None,
    latency_us=latency_us,
    status_code=status,
    role=role,
  )
  rows = len(classes)
  outputs = {} if status else {"classes": classes, "probabilities": probabilities}
  return prediction_log.make_record({"x": np.zeros((rows, 2), np.float32)}, outputs, meta)


@pytest.fixture(scope="module")
def shadow_logs(tmp_path_factory):
  """MIRRORED requests of 1 row (the first DISAGREE answered another class by the shadow, whose
  probabilities differ by 0.001 * i), plus one of 3 rows that agrees exactly; NOT_MIRRORED
  primaries; SHADOW_ERRORS shadow error records; one shadow whose primary was not logged.
  Primaries and shadows go to different files, in opposite orders."""
  rng = np.random.default_rng(0)
  logs = str(tmp_path_factory.mktemp("shadow") / "logs")
  os.makedirs(logs)
  primaries, shadows = [], []
  for i in range(MIRRORED + NOT_MIRRORED):
    label = np.array([i % 10], np.int32)
    probs = rng.dirichlet(np.ones(10), 1).astype(np.float32)
    primaries.append(_record(f"req-{i}", "primary", label, probs))
    if i < MIRRORED:
      other = (label + 1) % 10 if i < DISAGREE else label
      shifted = (probs + np.float32(0.001 * i)).astype(np.float32)
      shadows.append(_record(f"req-{i}", "shadow", other, shifted, latency_us=1500))
  many = np.arange(3, dtype=np.int32)
  probs = np.full((3, 10), 0.1, np.float32)
  primaries.append(_record("multi", "primary", many, probs))
  shadows.append(_record("multi", "shadow", many, probs, latency_us=1500))
  for i in range(SHADOW_ERRORS):
    shadows.append(_record(f"err-{i}", "shadow", many[:1], probs[:1], status=13))
  shadows.append(_record("orphan", "shadow", many[:1], probs[:1]))
  prediction_log.write_records(os.path.join(logs, "log-0"), primaries)
  prediction_log.write_records(os.path.join(logs, "log-1"), shadows[::-1])
  return logs


def test_pairs_by_request_id_with_the_exact_agreement_rate(shadow_logs, tmp_path, capsys):
  out = str(tmp_path / "report")
  assert shadow_report.main(["shadow_report", f"--logs={shadow_logs}", f"--out={out}"]) == 0
  record = json.loads(pathlib.Path(out, "shadow.json").read_text())
  assert record["pairs"] == MIRRORED + 3 and record["paired_requests"] == MIRRORED + 1
  assert record["agreement"] == pytest.approx(1 - DISAGREE / (MIRRORED + 3), abs=1e-12)
  assert record["shadow_errors"] == SHADOW_ERRORS
  assert record["shadow_records"] == MIRRORED + 1 + SHADOW_ERRORS + 1
  assert record["unpaired"] == {
    "primary requests not mirrored": NOT_MIRRORED,
    "shadow requests without a logged primary": 1,
  }
  assert record["latency_delta_ms"] == {"p50": 0.5, "p99": 0.5}
  diffs = {d["name"]: d for d in record["diffs"]}
  assert diffs["probabilities"]["max"] == pytest.approx(0.001 * (MIRRORED - 1), rel=1e-3)
  assert set(diffs) == {"probabilities"}  # class ids are compared by agreement only
  # The disagreeing rows come first in the most-different list, the largest shift first.
  top = record["top"]
  assert len(top) == 10
  assert [t["request_id"] for t in top] == [f"req-{i}" for i in range(DISAGREE - 1, 1, -1)]
  assert all(t["primary_class"] != t["shadow_class"] for t in top)
  assert record["versions"] == {"primary": ["1 (stable)"], "shadow": ["2 (candidate)"]}
  assert sorted(os.listdir(out)) == ["shadow.json", "shadow.md", "shadow.png"]
  text = pathlib.Path(out, "shadow.md").read_text()
  assert "Class agreement: **92.1569%**" in text
  assert "class agreement 0.9216" in capsys.readouterr().out


def test_bad_input_is_one_error_line(tmp_path, capsys):
  no_shadow = tmp_path / "no_shadow"
  no_shadow.mkdir()
  row = np.zeros((1, 10), np.float32)
  record = _record("a", "primary", np.zeros(1, np.int32), row)
  prediction_log.write_records(str(no_shadow / "log"), [record])
  empty = tmp_path / "empty"
  empty.mkdir()
  prediction_log.write_records(str(empty / "log"), [])
  cases = {
    f"--logs={tmp_path / 'missing'}": "is not a directory",
    f"--logs={empty}": "holds no complete record",
    f"--logs={no_shadow}": "is a shadow copy",
    f"--logs={no_shadow} --top=-1": "--top=-1 must be 0 or more",
    f"--logs={no_shadow} --top=x": "--top",
  }
  for flags, message in cases.items():
    argv = ["shadow_report", *flags.split(), f"--out={tmp_path}/o"]
    assert shadow_report.main(argv) == 1, flags
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (flags, err)
  assert not os.path.exists(tmp_path / "o")
