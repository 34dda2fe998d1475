"""The model registry (mlops.registry): version N is directory N, alias moves are audited
transactions that survive a kill between any two steps, rollback, the gate refusal, the pyfunc
flavor, bad input. One smoke digits run, registered twice, and one model server are shared."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import digits_cnn
from mlops import (
  registry,
  registry_audit,
  registry_promote,
  registry_register,
  registry_serving,
  registry_store,
)
from mlops.registry_store import RegistryError
from tests.helpers import model_server
from trainer import train

REPO = model_server.REPO


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A fresh SQLite registry for this module (MLFLOW_TRACKING_URI, restored afterwards)."""
  path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
  previous = os.environ.get("MLFLOW_TRACKING_URI")
  os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}"
  yield os.environ["MLFLOW_TRACKING_URI"]
  if previous is None:
    del os.environ["MLFLOW_TRACKING_URI"]
  else:
    os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  config = digits_cnn.get_config("smoke")
  config.data.worker_threads = 0
  workdir = tmp_path_factory.mktemp("digits_run")
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def registered(store, digits_run, tmp_path_factory):
  """digits versions 1 and 2 (both of the run's latest step) in a fresh export base."""
  base = str(tmp_path_factory.mktemp("models") / "digits")
  client = registry_store.client()
  for _ in range(2):
    registry_register.register(client, digits_run, base, "digits", "latest")
  return base


@pytest.fixture(scope="module")
def served(registered, tmp_path_factory):
  """A model server on the config file that `promote` writes (staging=1 to start with)."""
  config = str(tmp_path_factory.mktemp("serving") / "models.config")
  registry_promote.promote(
    registry_store.client(), "digits", 1, "staging", model_config_file=config
  )
  log = str(tmp_path_factory.mktemp("logs") / "server.log")
  with model_server.Server([f"--model_config_file={config}"], log) as server:
    server.config = config
    yield server


def _cli(*args, env=None, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "mlops.registry", *args],
    cwd=REPO,
    env={**model_server.SERVER_ENV, "PYTHONPATH": REPO, **(env or {})},
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _served_label(server, label):
  return registry_serving.served_version(f"127.0.0.1:{server.grpc_port}", "digits", label)


def test_version_n_is_directory_n_with_its_tags(registered):
  client = registry_store.client()
  for version in (1, 2):
    found = client.get_model_version("digits", str(version))
    assert found.source == os.path.join(registered, str(version))
    assert found.tags["registry.state"] == "ready"
    manifest = registry_register.read_manifest(found.source)
    assert found.tags["data.fingerprint"] == manifest["data_fingerprint"]
    assert found.tags["checkpoint.step"] == str(manifest["checkpoint_step"])
    assert found.tags["git.commit"] == str(manifest["git"]["commit"])
    assert json.loads(found.tags["export.parity"]) == manifest["parity_max_relative_error"]
    tags = registry_register.version_tags(manifest["workdir"], manifest, found.source)
    assert found.tags["export.manifest_sha256"] == tags["export.manifest_sha256"]
    assert os.path.isfile(os.path.join(found.source, "MLmodel"))
  assert sorted(e for e in os.listdir(registered) if e.isdigit()) == ["1", "2"]


def test_a_directory_that_is_not_the_next_version_is_an_error(registered, digits_run):
  os.makedirs(os.path.join(registered, "3"))
  try:
    with pytest.raises(RegistryError, match="never renumbered"):
      registry_register.register(
        registry_store.client(), digits_run, registered, "digits", "latest"
      )
  finally:
    os.rmdir(os.path.join(registered, "3"))
  # Nothing half-done: no version 3 in the registry, no staging directory left.
  versions = registry_store.versions_of(registry_store.client(), "digits")
  assert [str(v.version) for v in versions] == ["1", "2"]
  assert not [e for e in os.listdir(registered) if e.startswith(".staging")]


def test_promote_moves_alias_file_and_server_label_and_rollback_undoes_it(served):
  client = registry_store.client()
  server = f"127.0.0.1:{served.grpc_port}"
  begin = registry_promote.promote(
    client, "digits", 2, "staging", model_config_file=served.config, server=server, reason="t"
  )
  assert (begin["from"], begin["to"]) == (1, 2)
  assert registry_store.alias_version(client, "digits", "staging") == 2
  assert registry_serving.labels(registry_serving.read_text(served.config), "", "digits") == {
    "staging": 2
  }
  assert _served_label(served, "staging") == 2
  registry_promote.rollback(client, "digits", "staging", server=server)
  assert registry_store.alias_version(client, "digits", "staging") == 1
  assert _served_label(served, "staging") == 1
  records = registry_audit.read(registry_promote.export_base_of(client, "digits"))
  moves = [(r["kind"], r["from"], r["to"]) for r in records if r["event"] == "begin"][-2:]
  assert moves == [("promote", 1, 2), ("rollback", 2, 1)]
  assert all(r["user"] and r["time"] for r in records)
  with pytest.raises(RegistryError, match="no earlier version"):
    registry_promote.rollback(client, "digits", "staging")


def _consistent_state(served) -> tuple:
  """(MLflow alias, file label, server label) of staging after `list` has run."""
  client = registry_store.client()
  text = registry.list_text(client, "digits")
  assert "DISAGREES" not in text
  file_labels = registry_serving.labels(registry_serving.read_text(served.config), "", "digits")
  return (
    registry_store.alias_version(client, "digits", "staging"),
    file_labels.get("staging"),
    _served_label(served, "staging"),
  )


@pytest.mark.parametrize("kill_at", ["after_begin", "after_alias", "after_config", "after_server"])
def test_a_promote_killed_between_steps_leaves_a_consistent_state(served, store, kill_at):
  assert _consistent_state(served) == (1, 1, 1)
  result = _cli(
    "promote",
    "--name=digits",
    "--version=2",
    "--alias=staging",
    f"--model_config_file={served.config}",
    f"--server=127.0.0.1:{served.grpc_port}",
    env={"MLFLOW_TRACKING_URI": store, "MLOPS_REGISTRY_KILL_AT": kill_at},
  )
  assert result.returncode == -9, result.stderr[-2000:]
  # The restart: `list` recovers the interrupted move; all three agree on the old version.
  assert _consistent_state(served) == (1, 1, 1)
  records = registry_audit.read(registry_promote.export_base_of(registry_store.client(), "digits"))
  assert records[-1]["event"] == "recover"


def test_an_unreachable_server_restores_the_old_state(served):
  client = registry_store.client()
  with pytest.raises(RegistryError, match=r"cannot reach a model server.*nothing changed"):
    registry_promote.promote(
      client,
      "digits",
      2,
      "staging",
      model_config_file=served.config,
      server=f"127.0.0.1:{model_server.free_port()}",
    )
  assert _consistent_state(served) == (1, 1, 1)
  records = registry_audit.read(registry_promote.export_base_of(client, "digits"))
  assert records[-1]["event"] == "abort"


def test_production_needs_a_passing_gate_unless_forced(registered):
  client = registry_store.client()
  with pytest.raises(RegistryError, match="no gate record"):
    registry_promote.promote(client, "digits", 2, "production")
  client.set_model_version_tag("digits", "2", "gate.verdict", "fail")
  client.set_model_version_tag("digits", "2", "gate.failed", "quality.accuracy_floor,latency")
  try:
    with pytest.raises(RegistryError, match=r"quality\.accuracy_floor, latency"):
      registry_promote.promote(client, "digits", 2, "canary")
    assert registry_store.alias_version(client, "digits", "production") is None
    begin = registry_promote.promote(client, "digits", 2, "production", force=True, reason="t")
    assert begin["forced"] and registry_store.alias_version(client, "digits", "production") == 2
  finally:
    client.delete_registered_model_alias("digits", "production")
    client.delete_model_version_tag("digits", "2", "gate.verdict")


def test_pyfunc_answers_what_the_server_answers(served):
  import mlflow

  pixels = model_server.digits_pixels(8)
  model = mlflow.pyfunc.load_model("models:/digits@staging")
  got = model.predict(pixels)
  status, body = served.request(
    "POST",
    "/v1/models/digits/labels/staging:predict",
    json.dumps({"inputs": pixels.tolist()}).encode(),
  )
  assert status == 200, body
  np.testing.assert_allclose(got["probabilities"], body["outputs"]["probabilities"], rtol=1e-6)
  np.testing.assert_array_equal(got["classes"], body["outputs"]["classes"])


@pytest.fixture(params=["sqlite", "postgresql"])
def concurrent_store(request, tmp_path):
  """A fresh registry store of each kind (PostgreSQL from tests/conftest.py's server), its
  tables created before the racing processes start."""
  if request.param == "sqlite":
    uri = f"sqlite:///{tmp_path}/concurrent.db"
  else:
    uri = request.getfixturevalue("postgres").database("registry_concurrent")
  previous = os.environ["MLFLOW_TRACKING_URI"]
  os.environ["MLFLOW_TRACKING_URI"] = uri
  try:
    registry_store.client()
  finally:
    os.environ["MLFLOW_TRACKING_URI"] = previous
  return uri


def test_two_processes_registering_at_once_get_distinct_versions(
  concurrent_store, digits_run, tmp_path
):
  base = str(tmp_path / "concurrent")
  env = {**model_server.SERVER_ENV, "PYTHONPATH": REPO, "MLFLOW_TRACKING_URI": concurrent_store}
  command = [
    sys.executable,
    "-m",
    "mlops.registry",
    "register",
    f"--workdir={digits_run}",
    f"--export_base={base}",
    "--name=concurrent",
    "--step=latest",
  ]
  procs = [
    subprocess.Popen(
      command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for _ in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
  previous = os.environ["MLFLOW_TRACKING_URI"]
  os.environ["MLFLOW_TRACKING_URI"] = concurrent_store
  try:
    versions = registry_store.versions_of(registry_store.client(), "concurrent")
  finally:
    os.environ["MLFLOW_TRACKING_URI"] = previous
  assert [(str(v.version), v.source) for v in versions] == [
    (str(n), os.path.join(base, str(n))) for n in (1, 2)
  ]
  assert sorted(e for e in os.listdir(base) if e.isdigit()) == ["1", "2"]


def test_bad_input_is_one_line_and_exit_1(store, registered):
  cases = [
    (["list", "--name=nope"], "--name=nope is not a registered model"),
    (["lineage", "digits@nope"], "has no alias 'nope'"),
  ]
  for args, message in cases:
    result = _cli(*args, env={"MLFLOW_TRACKING_URI": store})
    assert result.returncode == 1, (args, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], (args, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
  client = registry_store.client()
  with pytest.raises(RegistryError, match=r"digits has no version 9 \(versions: 1, 2\)"):
    registry_promote.promote(client, "digits", 9, "staging")
  with pytest.raises(RegistryError, match="is not an alias"):
    registry_promote.promote(client, "digits", 1, "Prod!")


def test_an_unreachable_store_is_an_error(monkeypatch):
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://nobody@127.0.0.1:1/none")
  with pytest.raises(RegistryError, match=r"127\.0\.0\.1:1"):
    registry_store.client()


def test_an_alias_whose_directory_is_gone_is_an_error(registered):
  client = registry_store.client()
  path = os.path.join(registered, "2")
  os.rename(path, path + ".away")
  try:
    with pytest.raises(RegistryError, match="is gone"):
      registry_promote.promote(client, "digits", 2, "staging")
  finally:
    os.rename(path + ".away", path)
