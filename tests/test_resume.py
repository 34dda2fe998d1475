"""Checkpoints resume exactly, after SIGKILL mid-save and after SIGTERM (preemption)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers.checkpoints import restore_latest
from tests.helpers.configs import smoke_config
from trainer import checkpointing, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every 4 steps a checkpoint; evals (and best-checkpoint saves) only at the end.
OVERRIDES = {
  "train.num_steps": 12,
  "checkpoint.every_steps": 4,
  "eval.every_steps": 100,
  "checkpoint.keep_last": 5,
  "model.dropout_rate": 0.1,  # Per-step randomness must resume exactly too.
}


def _run(args, **kwargs):
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs
  )


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """The OVERRIDES run trained in one go (asynchronous saves): what every resume must equal."""
  workdir = tmp_path_factory.mktemp("straight")
  assert train.train_and_evaluate(smoke_config(OVERRIDES), str(workdir)).step == 12
  return restore_latest(smoke_config(OVERRIDES), workdir)


def test_synchronous_saves_resume_exactly(straight_run, tmp_path):
  config = smoke_config({**OVERRIDES, "checkpoint.async_save": False})
  assert train.train_and_evaluate(config, str(tmp_path)).step == 12
  assert checkpointing.existing_steps(str(tmp_path)) == [4, 8, 12]
  assert restore_latest(config, tmp_path)[0] == 12
  # Lose the last step (as if the job died before it), then resume from step 8.
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), "12"))
  assert train.train_and_evaluate(config, str(tmp_path)).step == 12
  step, state, data = restore_latest(config, tmp_path)
  assert (step, data) == straight_run[::2]
  jax.tree.map(np.testing.assert_array_equal, state, straight_run[1])  # Bitwise.


def test_sigkill_during_save_resumes_exactly(straight_run, tmp_path):
  config = smoke_config(OVERRIDES)

  killed = tmp_path / "killed"
  proc = _run(
    [
      "-m",
      "tests.helpers.kill_during_save",
      f"--workdir={killed}",
      "--kill_step=8",
      f"--overrides={json.dumps(OVERRIDES)}",
    ]
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  # Step 8 never completed; step 4 is the last complete checkpoint.
  assert checkpointing.existing_steps(str(killed)) == [4]

  resumed = train.train_and_evaluate(smoke_config(OVERRIDES), str(killed))
  assert resumed.step == 12
  step_a, state_a, data_a = straight_run
  step_b, state_b, data_b = restore_latest(config, killed)
  assert step_a == step_b == 12
  assert data_a == data_b  # The data stream continued where the checkpoint left it.
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)  # Bitwise.


def test_sigterm_saves_current_step_and_resume_continues(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "trainer.main",
      "--config=configs/digits_cnn.py:smoke",
      f"--workdir={workdir}",
      "--config.train.num_steps=100000",
      "--config.checkpoint.every_steps=1000",
      "--config.eval.every_steps=1000",
      "--config.train.log_every_steps=5",
    ],
    cwd=REPO,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 120
  for line in proc.stderr:
    if "step 15/100000" in line:
      break
    assert time.monotonic() < deadline, "training never reached step 15"
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "preempted" in stderr.lower() or "training preempted" in stderr.lower()
  steps = checkpointing.existing_steps(str(workdir))
  assert len(steps) == 1 and 15 <= steps[0] < 1000, steps  # Saved at the step it stopped.

  config = smoke_config({"train.num_steps": steps[0] + 3})
  result = train.train_and_evaluate(config, str(workdir))
  assert result.step == steps[0] + 3
  assert checkpointing.existing_steps(str(workdir))[-1] == steps[0] + 3


def test_finished_run_is_not_retrained(smoke_config, tmp_path):
  first = train.train_and_evaluate(smoke_config, str(tmp_path))
  again = train.train_and_evaluate(smoke_config, str(tmp_path))
  assert again.step == first.step == smoke_config.train.num_steps
  assert again.logged_losses == {}  # No step ran.
  assert again.eval_metrics == pytest.approx(first.eval_metrics)
