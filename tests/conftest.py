"""Test setup: 8 fake CPU devices (set before JAX starts) and small configs."""

import os
import shutil
import tempfile

# Must precede the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Every run in the session, and every process it starts (helpers snapshot os.environ at import),
# tracks to a throwaway SQLite store, never to the project root's mlflow.db.
os.environ["MLFLOW_TRACKING_URI"] = (
  f"sqlite:///{tempfile.mkdtemp(prefix='pytest-mlflow-')}/mlflow.db"
)

import jax
import pytest

from configs import digits_cnn


@pytest.fixture(scope="session", autouse=True)
def mlflow_test_store():
  """The session's throwaway MLflow store (set above), removed at the end."""
  store = os.path.dirname(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
  yield store
  shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
  """A real PostgreSQL server for the session (tests/helpers/postgres.py). Skips where no
  binaries exist, except under CI (CI=true), where .ci/run installs them and a skip would hide
  the distributed paths: there it fails."""
  from tests.helpers import postgres as postgres_helper

  bin_dir = postgres_helper.find_bin_dir()
  if bin_dir is None:
    message = "PostgreSQL binaries (initdb, pg_ctl) not found; apt-get install postgresql"
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI: {message} (.ci/run does this)")
    pytest.skip(message)
  server = postgres_helper.PostgresServer(bin_dir)
  try:
    server.start()
    yield server
  finally:
    server.stop()


@pytest.fixture
def smoke_config():
  """The digits smoke config: a tiny CNN, 20 steps of 32 examples. The end-of-run report is off
  (seconds of plotting per run); tests of the report turn it on."""
  config = digits_cnn.get_config("smoke")
  config.data.worker_threads = 0
  config.tracking.report = False
  return config


@pytest.fixture
def one_device():
  return jax.devices()[:1]


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].device_kind}"
