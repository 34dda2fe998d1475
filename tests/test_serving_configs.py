"""The example server configs shipped in configs/serving/ load with the server's own parsers,
and the README's commands name them as they are."""

import os

import pytest

pytest.importorskip("tensorflow_serving", reason="the serving side needs tensorflow-serving-api")

from serving.server import batching, model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_CONFIG = "configs/serving/models.config"
BATCHING_CONFIG = "configs/serving/batching.config"


def test_models_config_serves_what_make_run_exports():
  (digits,) = model_config.read(os.path.join(REPO, MODELS_CONFIG))
  # `make run` exports to runs/models/digits (Makefile EXPORT_BASE), relative to the repository.
  assert (digits.name, digits.base_path) == ("digits", "runs/models/digits")
  assert digits.version_policy == model_config.VersionPolicy("latest", num_versions=2)
  with open(os.path.join(REPO, "Makefile")) as f:
    assert "EXPORT_BASE ?= runs/models/digits\n" in f.read()


def test_batching_config_pads_to_sizes_that_end_at_the_maximum():
  options = batching.read_batching_parameters(os.path.join(REPO, BATCHING_CONFIG))
  assert options.max_batch_size == 32 and options.batch_timeout_micros == 2000
  assert options.batch_sizes == (1, 4, 8, 16, 32)
  assert options.padded_size(5) == 8


def test_the_readme_server_command_uses_the_shipped_files():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert f"--model_config_file={MODELS_CONFIG}" in readme
  assert f"--batching_parameters_file={BATCHING_CONFIG}" in readme
