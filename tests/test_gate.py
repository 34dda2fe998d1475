"""The validation gate (mlops.validate): the first version gets absolute checks only; a second
is compared with it (paired statistics, served path through a real server, compatibility); the
record lands in MLflow tags and beside the version; promote honours it; bad gate input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import digits_cnn
from mlops import (
  gate_quality,
  model_card,
  registry_promote,
  registry_register,
  registry_store,
  validate,
)
from mlops.registry_store import RegistryError
from tests.helpers import model_server
from trainer import train

REPO = model_server.REPO
SMOKE_GATE = os.path.join(REPO, "configs", "gates", "smoke.py")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
  previous = os.environ.get("MLFLOW_TRACKING_URI")
  os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}"
  yield os.environ["MLFLOW_TRACKING_URI"]
  if previous is None:
    del os.environ["MLFLOW_TRACKING_URI"]
  else:
    os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def two_versions(store, tmp_path_factory):
  """digits versions 1 and 2 of one smoke run (20 and 10 steps: different checkpoints)."""
  config = digits_cnn.get_config("smoke")
  config.data.worker_threads = 0
  config.checkpoint.every_steps = 10
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(config, workdir)
  base = str(tmp_path_factory.mktemp("models") / "digits")
  client = registry_store.client()
  for step in ("10", "20"):
    registry_register.register(client, workdir, base, "digits", step)
  return base


def test_statistics_are_paired_and_bounded():
  rng = np.random.default_rng(0)
  baseline = (rng.random(400) < 0.9).astype(float)
  same = gate_quality.mcnemar(baseline, baseline, 0.95)
  assert same[0] == 0 and same[1] == (0, 0) and same[2] == 1.0
  worse = baseline.copy()
  worse[np.flatnonzero(baseline)[:40]] = 0  # 40 of the right answers turn wrong: -10 points.
  diff, (low, high), p, (b_only, c_only) = gate_quality.mcnemar(baseline, worse, 0.95)
  assert (b_only, c_only) == (40, 0) and diff == -0.1 and low < -0.1 < high < 0 and p < 1e-9
  losses = rng.random(400)
  diff, (low, high) = gate_quality.paired_bootstrap(losses, losses + 0.5, np.mean, 0.95, 200, 0)
  assert diff == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)


@pytest.fixture(scope="module")
def first_record(two_versions):
  """The gate record of version 1 (no production version yet)."""
  return validate.validate(registry_store.client(), "digits", 1, "production", SMOKE_GATE)


def test_first_version_gets_absolute_checks_only(first_record):
  client = registry_store.client()
  record = first_record
  names = [c["name"] for c in record["checks"]]
  assert record["baseline"] is None and "no version" in record["baseline_note"]
  assert not [n for n in names if "regression" in n or "ratio" in n or n == "compat.signatures"]
  assert {"quality.accuracy_floor", "served.warmup_replay", "served.parity_grpc"} <= set(names)
  assert {"served.parity_rest", "served.latency_bs1", "served.latency_bs32"} <= set(names)
  tags = client.get_model_version("digits", "1").tags
  assert tags["gate.verdict"] == record["verdict"]
  with open(tags["gate.record"]) as f:
    assert json.load(f)["checks"] == record["checks"]
  parity = {c["name"]: c for c in record["checks"]}["served.parity_grpc"]
  assert parity["verdict"] == "pass" and parity["measured"] <= 1e-4


def test_second_version_is_compared_with_the_baseline_and_promote_honours_it(
  two_versions, first_record
):
  client = registry_store.client()
  assert first_record["verdict"] == "pass", first_record["failed"]
  registry_promote.promote(client, "digits", 1, "production")
  record = validate.validate(client, "digits", 2, "production", SMOKE_GATE)
  checks = {c["name"]: c for c in record["checks"]}
  assert record["baseline"] == 1
  assert "McNemar" in checks["quality.accuracy_regression"]["detail"]
  assert "bootstrap" in checks["quality.loss_regression"]["detail"]
  assert {"served.latency_p50_ratio_bs1", "served.latency_p99_ratio_bs32"} <= set(checks)
  assert checks["compat.signatures"]["verdict"] == "pass"
  # A gate no candidate can pass: promote refuses it, naming the failed checks.
  strict = os.path.join(os.path.dirname(two_versions), "strict.py")
  with open(strict, "w") as f:
    f.write(
      "from configs.gates import smoke\n"
      "def get_gate_config():\n"
      "  c = smoke.get_gate_config()\n"
      "  c.quality.floors = {'accuracy': 1.01}\n"
      "  c.served.enabled = False\n"
      "  return c\n"
    )
  failed = validate.validate(client, "digits", 2, "production", strict)
  assert failed["verdict"] == "fail" and "quality.accuracy_floor" in failed["failed"]
  with pytest.raises(RegistryError, match=r"its gate failed: quality\.accuracy_floor"):
    registry_promote.promote(client, "digits", 2, "production")
  with open(os.path.join(two_versions, "2", model_card.CARD)) as f:
    card = f.read()
  assert card.startswith("---\n") and "model-index" in card and "FAIL against version 1" in card
  assert "no labelled traffic yet" in card and "confusion_matrix.png" in card
  assert os.path.getsize(os.path.join(two_versions, "2", model_card.CONFUSION_PNG)) > 5000


def test_a_gate_naming_an_unknown_metric_is_an_error(two_versions, tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(
    "from configs.gates import smoke\n"
    "def get_gate_config():\n"
    "  c = smoke.get_gate_config()\n"
    "  c.quality.floors = {'f1': 0.5}\n"
    "  return c\n"
  )
  with pytest.raises(RegistryError, match="unknown metric 'f1'"):
    validate.validate(registry_store.client(), "digits", 2, "1", str(bad))


def test_a_baseline_on_other_test_data_is_an_error(two_versions):
  client = registry_store.client()
  client.set_model_version_tag("digits", "1", "gate.test_fingerprint", "sha256:other")
  try:
    with pytest.raises(RegistryError, match="sha256:other"):
      validate.validate(client, "digits", 2, "1", SMOKE_GATE)
  finally:
    client.delete_model_version_tag("digits", "1", "gate.test_fingerprint")


def test_cli_prints_the_table_and_bad_input_is_one_line(two_versions, store):
  env = {**model_server.SERVER_ENV, "PYTHONPATH": REPO, "MLFLOW_TRACKING_URI": store}
  result = subprocess.run(
    [sys.executable, "-m", "mlops.validate", "--name=digits", "--candidate=7"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
    "error: digits has no version 7 (versions: 1, 2)"
  ]
