"""Test setup: 8 fake CPU devices (set before JAX starts) and small configs."""

import os

# Must precede the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

from configs import digits_cnn


@pytest.fixture
def smoke_config():
  """The digits smoke config: a tiny CNN, 20 steps of 32 examples."""
  config = digits_cnn.get_config("smoke")
  config.data.worker_threads = 0
  return config


@pytest.fixture
def one_device():
  return jax.devices()[:1]


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].device_kind}"
