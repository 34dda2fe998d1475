"""The first seconds of a run: a SIGTERM during startup, and the progress line after a resume."""

import logging
import os
import re
import signal
import subprocess
import sys
import time

from tests.helpers.configs import smoke_config
from trainer import checkpointing, train
from trainer.metrics import ProgressLogger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cli(workdir, *overrides):
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "trainer.main",
      "--config=configs/digits_cnn.py:smoke",
      f"--workdir={workdir}",
      "--config.train.num_steps=6",
      "--config.eval.max_batches=1",
      *overrides,
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_until_sigterm_blocked(pid: int, timeout_s: float = 60.0) -> None:
  """Polls /proc/PID/status until the process blocks SIGTERM (its SigBlk mask has the bit)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    with open(f"/proc/{pid}/status") as f:
      status = dict(line.split(":", 1) for line in f if ":" in line)
    if int(status["SigBlk"].strip(), 16) & (1 << (signal.SIGTERM - 1)):
      return
    time.sleep(0.005)
  raise AssertionError(f"process {pid} did not block SIGTERM within {timeout_s} s")


def test_sigterm_in_the_first_second_exits_0_with_a_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  proc = _train_cli(workdir)
  # As soon as trainer.main has blocked SIGTERM (its first statement, before any import): still
  # importing, long before the training loop exists.
  _wait_until_sigterm_blocked(proc.pid)
  assert proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  # The signal waited for the loop: one step ran and was checkpointed, so a rerun resumes there
  # (tests/test_resume.py checks that resuming after SIGTERM is exact).
  assert "training preempted at step 1" in stdout, stdout + stderr[-3000:]
  assert "Preempted: saved the checkpoint at step 1" in stderr
  assert checkpointing.existing_steps(str(workdir)) == [1]


def test_progress_rate_is_pending_until_a_step_ran():
  progress = ProgressLogger(total_steps=100, first_step=40)
  # The first step after a resume marks the start of the timed interval ...
  assert progress.steps_per_sec(41) > 0
  # ... and a logging step at that same step has no rate yet, instead of 0 (ETA "forever").
  assert progress.steps_per_sec(41) != progress.steps_per_sec(41)  # NaN
  time.sleep(0.01)
  rate = progress.steps_per_sec(45)
  assert 0 < rate < 4 / 0.01


def test_only_the_enabled_process_prints_progress(caplog):
  caplog.set_level(logging.INFO)
  ProgressLogger(total_steps=10, first_step=0, enabled=False).log(5, 0.5, 100.0)
  assert not [r for r in caplog.records if r.getMessage().startswith("step ")]
  ProgressLogger(total_steps=10, first_step=0).log(5, 0.5, 100.0)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert lines == ["step 5/10 (50%) | loss 0.5000 | 100.0 steps/s | ETA 0:00:00"], lines


def test_eta_after_resume_is_sane(tmp_path, one_device, caplog):
  workdir = str(tmp_path / "run")
  overrides = {"checkpoint.every_steps": 4, "eval.every_steps": 100, "eval.max_batches": 1}
  first = smoke_config({**overrides, "train.num_steps": 4, "train.log_every_steps": 5})
  train.train_and_evaluate(first, workdir, devices=one_device)
  caplog.set_level(logging.INFO)
  caplog.clear()  # Only the resumed run's lines.
  # Resumes at step 4: its first step, 5, is a logging step.
  resumed = smoke_config({**overrides, "train.num_steps": 15, "train.log_every_steps": 5})
  result = train.train_and_evaluate(resumed, workdir, devices=one_device)
  assert result.step == 15
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert [line.split()[1] for line in lines] == ["5/15", "10/15", "15/15"], lines
  assert lines[0].endswith("| rate pending | ETA unknown"), lines[0]
  for line in lines[1:]:
    eta = re.search(r"ETA (\d+):(\d\d):(\d\d)$", line)
    assert eta, line  # h:mm:ss, no "days"
    assert int(eta.group(1)) * 3600 + int(eta.group(2)) * 60 + int(eta.group(3)) < 600, line


def test_preemption_watcher_unblocks_sigterm_for_the_loop_only():
  """trainer.main blocks SIGTERM from its first line; the watcher receives it during the loop and
  blocks it again afterwards, so a SIGTERM after the loop cannot cut the final save short."""
  from trainer.preemption import PreemptionWatcher

  blocked = lambda: signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # noqa: E731
  assert not blocked()
  with PreemptionWatcher():  # Not blocked before (a library call): the mask is left alone.
    assert not blocked()
  assert not blocked()
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
  try:
    with PreemptionWatcher() as watcher:
      assert not blocked()
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)  # The handler runs in the main thread between bytecodes.
      assert watcher.should_stop(1)
    assert blocked()
  finally:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
