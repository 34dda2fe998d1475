"""The canary controller end to end (`python -m mlops.rollout canary`): the real MLflow registry
(a temporary SQLite store) and a real model server splitting real REST requests by the traffic
file the controller writes: bad input moves nothing; an erroring candidate is rolled back after
`threshold` intervals with no failed request on the stable arm; a good one is promoted after
max_weight / step_weight intervals with no failed request at all. The checks and the loop on
synthetic logs and a fake clock are tests/test_canary.py."""

import json
import os
import shutil
import socket
import subprocess

import pytest

pytest.importorskip("tensorflow_serving", reason="the model server needs TF Serving's protos")

from mlops import (
  canary_traffic,
  prediction_log,
  registry_audit,
  registry_serving,
  registry_store,
  rollout,
)
from tests.helpers import model_server, shadow_models
from tests.helpers.load import Load


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


def test_a_second_controller_on_the_same_model_moves_nothing(served, capsys):
  """A controller whose lock another live process holds (a canary of the same model elsewhere)
  exits 1 naming the holder and leaves the lock and every label as they were."""
  before = _state(served)
  lock = os.path.join(served.paths["base"], rollout.CANARY_LOCK)
  holder = subprocess.Popen(["sleep", "60"])
  try:
    with open(lock, "w") as f:
      json.dump({"pid": holder.pid, "host": socket.gethostname(), "started": 0}, f)
    assert _canary_cli(served, 2) == 1
    err = capsys.readouterr().err
    assert f"error: a canary of digits is already running (pid {holder.pid}" in err, err
    assert "Traceback" not in err and os.path.exists(lock)
  finally:
    holder.kill()
    holder.wait()
    os.remove(lock)
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
