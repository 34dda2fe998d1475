"""Bad configs and workdirs fail with a message naming the value and the fix; nothing is written."""

import os
import subprocess
import sys

import pytest

from trainer import train
from trainer.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(path):
  """Every file under `path` with its size and mtime (empty if it does not exist)."""
  found = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      stat = os.stat(full)
      found[full] = (stat.st_size, stat.st_mtime_ns)
  return found


CASES = {
  "unknown_model": (
    {"model.name": "resnet9000"},
    r"unknown model 'resnet9000'.*config\.model\.name.*cnn",
  ),
  "unknown_dataset": (
    {"data.name": "imagenet"},
    r"config\.data\.name='imagenet' is not one of the choices.*'digits'",
  ),
  "unknown_optimizer": ({"optim.name": "adagrad9"}, r"config\.optim\.name='adagrad9' .*'adamw'"),
  "mesh_product": (
    {"mesh.data": 2, "mesh.fsdp": 2},
    r"mesh data=2 x fsdp=2 x tensor=1 needs 4 devices but 8 are present",
  ),
  "mesh_fill_indivisible": ({"mesh.data": -1, "mesh.tensor": 3}, r"8 devices do not divide by 3"),
  "batch_not_divisible": (
    {"train.global_batch_size": 30},
    r"global batch 30 \(config\.train\.global_batch_size\) is not divisible by the "
    r"data-parallel size 8",
  ),
  "missing_data_path": (
    {"data.name": "npz", "data.train_path": "/nonexistent/train.npz", "data.eval_path": "x"},
    r"config\.data\.train_path='/nonexistent/train\.npz' matches no file",
  ),
  "bad_schedule": ({"optim.schedule": "step"}, r"config\.optim\.schedule='step' .*'cosine'"),
  "grad_accum_indivisible": (
    {"optim.grad_accum_steps": 3},
    r"grad_accum_steps=3 must divide the 4 rows",
  ),
}


def _apply(config, overrides):
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    config[section][key] = value


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_rejected_before_writing(smoke_config, tmp_path, case):
  overrides, message = CASES[case]
  _apply(smoke_config, overrides)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(smoke_config, str(workdir))
  assert not workdir.exists()


def test_unreadable_data_path(smoke_config, tmp_path):
  # A directory where a file should be is unreadable as data for every user, root included
  # (root reads files whatever their permission bits).
  path = tmp_path / "train.npz"
  path.mkdir()
  _apply(
    smoke_config, {"data.name": "npz", "data.train_path": str(path), "data.eval_path": str(path)}
  )
  with pytest.raises(
    ConfigError, match=r"config\.data\.train_path: .*train\.npz is not a readable file"
  ):
    train.train_and_evaluate(smoke_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_corrupt_data_file(smoke_config, tmp_path):
  path = tmp_path / "train.npz"
  path.write_bytes(b"this is not an npz archive")
  _apply(
    smoke_config, {"data.name": "npz", "data.train_path": str(path), "data.eval_path": str(path)}
  )
  with pytest.raises(ConfigError, match=r"cannot read .*train\.npz as \.npz"):
    train.train_and_evaluate(smoke_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_incompatible_checkpoint_names_the_parameter(smoke_config, tmp_path):
  workdir = tmp_path / "run"
  smoke_config.train.num_steps = 10
  train.train_and_evaluate(smoke_config, str(workdir))
  before = _snapshot(workdir)

  smoke_config.model.name = "cnn"  # Wider layers than the cnn_tiny that wrote the checkpoint.
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(smoke_config, str(workdir))
  message = str(error.value)
  assert "incompatible config" in message
  assert "first params/conv_0/bias: checkpoint (8,), this config (32,)" in message
  assert "config.model.name was 'cnn_tiny', now 'cnn'" in message
  assert "new --workdir" in message
  assert _snapshot(workdir) == before


def test_cli_exits_nonzero_with_the_message(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "trainer.main",
      "--config=configs/digits_cnn.py:smoke",
      f"--workdir={workdir}",
      "--config.model.name=nope",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert "error: unknown model 'nope' (config.model.name)" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_cli_rejects_misspelled_override(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "trainer.main",
      "--config=configs/digits_cnn.py:smoke",
      f"--workdir={tmp_path / 'run'}",
      "--config.optim.learning_rat=0.1",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
    "error: --config.optim.learning_rat=0.1: config.optim has no field 'learning_rat'; "
    "did you mean 'learning_rate'?"
  ]
  assert not (tmp_path / "run").exists()


def test_unknown_config_argument():
  from configs import digits_cnn

  with pytest.raises(ValueError, match=r"unknown config argument 'smok'.*\['smoke'\]"):
    digits_cnn.get_config("smok")
