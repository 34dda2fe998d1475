"""Several processes on localhost rehearse a multi-host job (jax.distributed over gloo)."""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers.checkpoints import restore_latest
from tests.helpers.configs import smoke_config
from trainer import checkpointing, distributed, train, watchdog
from trainer.data import pipeline as input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "scripts", "launch_local.sh")
# 6 steps, a loss every step, one checkpoint at the end; dropout so per-step RNG must agree too.
OVERRIDES = {
  "train.num_steps": 6,
  "train.log_every_steps": 1,
  "eval.every_steps": 6,
  "checkpoint.every_steps": 6,
  "model.dropout_rate": 0.1,
  "mesh.data": 2,
  "mesh.fsdp": 4,
  # A schedule that does not depend on num_steps, so a run extended from 6 to 9 steps trains
  # exactly like one that planned 9 from the start.
  "optim.schedule": "constant",
}


def _flags(overrides):
  return [f"--config.{key}={value}" for key, value in overrides.items()]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, overrides, *, num_processes=2, timeout=300):
  proc = subprocess.run(
    [
      LAUNCHER,
      f"--num_processes={num_processes}",
      "--devices_per_process=4",
      "--",
      "--config=configs/digits_cnn.py:smoke",
      f"--workdir={workdir}",
      *_flags(overrides),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, "PYTHON": sys.executable},
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _spawn(workdir, overrides, process_id, port, extra=(), env=None):
  """One trainer process of a 2 x 4-device job, started directly (so tests can signal it)."""
  return subprocess.Popen(
    [
      sys.executable,
      "-u",
      "-m",
      "trainer.main",
      "--config=configs/digits_cnn.py:smoke",
      f"--workdir={workdir}",
      *_flags(overrides),
      *extra,
      *(
        [
          f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2",
          f"--process_id={process_id}",
        ]
        if port
        else []
      ),
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", **(env or {})},
  )


def _tensorboard_losses(workdir):
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  return {e.step: e.value for e in events.Scalars("train/loss")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The smoke config trained by 2 processes x 4 devices and by 1 process x 8 devices."""
  root = tmp_path_factory.mktemp("multihost")
  _launch(root / "two", OVERRIDES)
  single = train.train_and_evaluate(smoke_config(OVERRIDES), str(root / "one"))
  return root, single


def test_two_processes_match_one_process(runs):
  root, single = runs
  losses = _tensorboard_losses(root / "two")
  assert sorted(losses) == list(range(1, 7))
  np.testing.assert_allclose(
    [losses[s] for s in range(1, 7)], [single.logged_losses[s] for s in range(1, 7)], rtol=1e-5
  )
  config = smoke_config(OVERRIDES)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    restore_latest(config, root / "two")[1].params,
    restore_latest(config, root / "one")[1].params,
  )


def test_only_process_zero_writes_but_all_save(runs):
  root, _ = runs
  events = [f for f in os.listdir(root / "two" / "tensorboard") if f.startswith("events")]
  assert len(events) == 1
  manifest = (root / "two" / "manifest.json").read_text()
  assert '"process_count": 2' in manifest
  saved = sorted(os.listdir(root / "two" / "checkpoints" / "6" / "data_iter"))
  assert [f for f in saved if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=4), dict(data=1, fsdp=1)], ids=["8dev", "1dev"])
def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path, mesh):
  """Resharding restore: 2 x 4 devices -> 1 process with another mesh, then 3 more steps,
  equal to a single process that trained all 9 steps (data stream included)."""
  root, _ = runs
  devices = None if mesh["data"] * mesh["fsdp"] == 8 else jax.devices()[:1]
  nine = {**OVERRIDES, "train.num_steps": 9, "mesh.data": mesh["data"], "mesh.fsdp": mesh["fsdp"]}
  shutil.copytree(root / "two", tmp_path / "resumed")
  resumed = train.train_and_evaluate(smoke_config(nine), str(tmp_path / "resumed"), devices)
  straight = train.train_and_evaluate(smoke_config(nine), str(tmp_path / "straight"), devices)
  assert resumed.step == 9
  np.testing.assert_allclose(
    [resumed.logged_losses[s] for s in (7, 8, 9)],
    [straight.logged_losses[s] for s in (7, 8, 9)],
    rtol=1e-5,
  )


def test_one_process_checkpoint_resumes_in_two_processes(runs, tmp_path):
  root, _ = runs
  nine = {**OVERRIDES, "train.num_steps": 9}
  shutil.copytree(root / "one", tmp_path / "resumed")
  _launch(tmp_path / "resumed", nine)
  straight = train.train_and_evaluate(smoke_config(nine), str(tmp_path / "straight"))
  losses = _tensorboard_losses(tmp_path / "resumed")
  np.testing.assert_allclose(
    [losses[s] for s in (7, 8, 9)], [straight.logged_losses[s] for s in (7, 8, 9)], rtol=1e-5
  )


def test_processes_read_disjoint_rows_covering_each_epoch():
  ids = np.arange(40, dtype=np.float32)[:, None]
  source = [{"inputs": ids[i], "labels": np.int32(0)} for i in range(40)]
  per_process = [
    input_pipeline.local_batches(
      source, global_batch_size=8, seed=0, shuffle=True, process_index=p, process_count=2
    )
    for p in range(2)
  ]
  single = input_pipeline.local_batches(
    source, global_batch_size=8, seed=0, shuffle=True, process_index=0, process_count=1
  )
  seen = []
  for b in range(10):  # Two epochs of 40 examples in global batches of 8.
    rows = np.concatenate([per_process[p][b]["inputs"][:, 0] for p in range(2)])
    np.testing.assert_array_equal(rows, single[b]["inputs"][:, 0])  # Same global batch.
    seen.append(rows)
  seen = np.concatenate(seen)
  for epoch in (seen[:40], seen[40:]):
    assert sorted(epoch) == list(range(40))  # None twice, none skipped.


def _wait_for(proc, text, timeout=180):
  deadline = time.monotonic() + timeout
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return lines
    if time.monotonic() > deadline:
      break
  raise AssertionError(f"never saw {text!r}:\n{''.join(lines[-30:])}")


def test_sigterm_to_one_process_saves_all_at_the_same_step(tmp_path):
  port = _free_port()
  long_run = {
    **OVERRIDES,
    "train.num_steps": 100000,
    "checkpoint.every_steps": 1000,
    "eval.every_steps": 1000,
    "train.log_every_steps": 5,
  }
  procs = [_spawn(tmp_path, long_run, i, port) for i in range(2)]
  _wait_for(procs[0], "step 10/100000")
  procs[1].send_signal(signal.SIGTERM)  # Preempt only the second host.
  outputs = [p.communicate(timeout=180)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  steps = checkpointing.existing_steps(str(tmp_path))
  assert len(steps) == 1 and 10 <= steps[0] < 1000, steps
  saved = os.listdir(tmp_path / "checkpoints" / str(steps[0]) / "data_iter")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(saved)
  assert f"training preempted at step {steps[0]}" in outputs[0]


def test_a_dead_process_makes_the_others_fail(tmp_path):
  port = _free_port()
  long_run = {
    **OVERRIDES,
    "train.num_steps": 100000,
    "checkpoint.every_steps": 5,
    "eval.every_steps": 1000,
    "train.log_every_steps": 5,
  }
  extra = ["--heartbeat_timeout_seconds=5"]
  procs = [_spawn(tmp_path, long_run, i, port, extra) for i in range(2)]
  _wait_for(procs[0], "step 10/100000")
  procs[1].kill()
  start = time.monotonic()
  output = procs[0].communicate(timeout=120)[0]
  assert procs[0].returncode != 0
  assert time.monotonic() - start < 120
  assert any(word in output.lower() for word in ("heartbeat", "unavailable", "failed", "error"))
  # What remains is a set of complete checkpoints; the restarted job resumes from the last one.
  saved = checkpointing.existing_steps(str(tmp_path))
  assert saved
  resumed = train.train_and_evaluate(
    smoke_config({**long_run, "train.num_steps": saved[-1] + 2}), str(tmp_path)
  )
  assert resumed.step == saved[-1] + 2


def _slurm_job_id_and_port():
  """A job id whose SLURM coordinator port (JAX: job id % 4096 + 61440) is free here."""
  for port in range(61440 + os.getpid() % 4096, 61440 + 4096):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return 4096 * 1000 + port - 61440, port
  raise AssertionError("no free port in SLURM's coordinator range")


def _slurm_task_environment(job_id: int, task: int, tasks: int = 2) -> dict:
  """The variables srun sets in each task of a one-node job of `tasks` tasks (slurm 22.05)."""
  return {
    "SLURM_JOB_ID": str(job_id),
    "SLURM_JOBID": str(job_id),
    "SLURM_JOB_NAME": "jax-train",
    "SLURM_JOB_NODELIST": "localhost",
    "SLURM_NODELIST": "localhost",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_NNODES": "1",
    "SLURM_NTASKS": str(tasks),
    "SLURM_NPROCS": str(tasks),
    "SLURM_TASKS_PER_NODE": str(tasks),
    "SLURM_NTASKS_PER_NODE": str(tasks),
    "SLURM_CPUS_PER_TASK": "1",
    "SLURM_CPUS_ON_NODE": str(tasks),
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_STEP_NODELIST": "localhost",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_NUM_TASKS": str(tasks),
    "SLURM_STEP_TASKS_PER_NODE": str(tasks),
    "SLURM_PROCID": str(task),
    "SLURM_LOCALID": str(task),
    "SLURM_NODEID": "0",
    "SLURMD_NODENAME": "localhost",
    "SLURM_SUBMIT_DIR": REPO,
    "SLURM_CLUSTER_NAME": "test",
  }


def test_slurm_environment_of_two_tasks_is_detected(tmp_path):
  """The SLURM path: the variables srun sets, no coordinator flags; JAX finds the rest, and
  the log says what it resolved (the coordinator from the node list and the job id)."""
  job_id, port = _slurm_job_id_and_port()
  overrides = {**OVERRIDES, "train.num_steps": 2, "eval.every_steps": 2}
  procs = [
    _spawn(tmp_path, overrides, i, None, env=_slurm_task_environment(job_id, i)) for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
  for i, output in enumerate(outputs):
    assert "Initializing jax.distributed (SLURM)" in output
    assert (
      f"Cluster: SLURM | process {i} of 2 | coordinator localhost:{port} | "
      "4 local / 8 global devices (cpu)"
    ) in output, output[-3000:]


def test_one_slurm_task_runs_without_jax_distributed(caplog):
  with caplog.at_level(logging.INFO):
    started = distributed.initialize(
      distributed.DistributedOptions(), {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}
    )
  assert not started
  assert "SLURM job 77 with one task (SLURM_NTASKS=1): one process, jax.distributed not" in (
    caplog.text
  )
  assert "Cluster: SLURM | process 0 of 1 | coordinator none | 8 local / 8 global" in caplog.text


def _wait_all(procs, timeout_s: float) -> tuple[list[str], list[float]]:
  """Every process's output and the monotonic time it was seen exited, polling all at once."""
  outputs: list[str | None] = [None] * len(procs)
  ended = [0.0] * len(procs)
  deadline = time.monotonic() + timeout_s
  while None in outputs and time.monotonic() < deadline:
    for i, proc in enumerate(procs):
      if outputs[i] is None and proc.poll() is not None:
        outputs[i], ended[i] = proc.communicate()[0], time.monotonic()
    time.sleep(0.2)
  for i, proc in enumerate(procs):
    if outputs[i] is None:
      proc.kill()
      outputs[i] = proc.communicate()[0]
      pytest.fail(f"process {i} did not exit within {timeout_s} s:\n{outputs[i][-3000:]}")
  return outputs, ended


def test_watchdog_ends_every_process_of_a_stalled_job(tmp_path):
  """Process 1 stalls in its input stage while process 0 waits for the step's collective. Both
  are alive (no heartbeat fails), so only the watchdog can end them; both stall timeouts start
  within milliseconds of each other, so either watchdog may fire first:

  * process 1's first: it exits 3 with its stack; process 0 then stalls too (its own watchdog)
    or sees its collective fail when process 1's sockets close and leaves at once
    (trainer/distributed.py's exit_failed_process) instead of waiting out the heartbeat
    timeout and aborting;
  * process 0's first: it exits 3; process 1 then leaves through exit_failed_process, or, since
    process 0 hosted JAX's coordination service, JAX terminates it first (a LOG(FATAL), exit
    -6: JAX's behaviour, not ours), whichever comes first.
  Either way every process is gone within seconds, each with a reason in its log."""
  port = _free_port()
  overrides = {
    **OVERRIDES,
    "train.num_steps": 100,
    "train.log_every_steps": 100,
    "eval.every_steps": 100,
    "checkpoint.every_steps": 100,
    "train.stall_timeout_s": 8,
  }
  stall = {watchdog.STALL_INJECTION_ENV: "5:600"}
  procs = [_spawn(tmp_path, overrides, i, port, env=stall if i else None) for i in range(2)]
  outputs, ended = _wait_all(procs, timeout_s=240)
  codes = [p.returncode for p in procs]
  first = 1 if codes[1] == watchdog.STALL_EXIT_CODE else 0
  assert codes[first] == watchdog.STALL_EXIT_CODE, (codes, outputs[first][-3000:])
  assert "Watchdog: thread MainThread" in outputs[first], outputs[first][-3000:]
  # Well within the 100 s heartbeat timeout that a shutdown barrier would wait for.
  assert abs(ended[0] - ended[1]) < 60, (codes, outputs[1 - first][-3000:])
  if first == 1:
    assert "in stage 'input'" in outputs[1], outputs[1][-3000:]
    assert "in next_batch" in outputs[1]  # The stalled process's stack shows where it is.
  # The other process ends with a reason, never by a clean exit or a silent abort.
  other = 1 - first
  reasons = {
    watchdog.STALL_EXIT_CODE: "Watchdog: no progress",
    distributed.PEER_FAILURE_EXIT_CODE: f"process {other}/2: a cross-process computation failed",
    1: f"process {other}/2 failed; exiting without the shutdown barrier",
  }
  if other == 1:  # Only the coordinator's end makes JAX terminate a process.
    reasons[-signal.SIGABRT] = "JAX distributed service detected fatal errors"
  assert codes[other] in reasons, (codes, outputs[other][-3000:])
  assert reasons[codes[other]] in outputs[other], outputs[other][-3000:]


def test_launcher_kills_what_ignores_sigterm(tmp_path):
  """Both processes stall in their input stage, where SIGTERM (taken by JAX's preemption
  notifier) cannot stop them; after the grace period the launcher SIGKILLs them."""
  workdir = tmp_path / "stuck"
  launcher = subprocess.Popen(
    [
      LAUNCHER,
      "--num_processes=2",
      "--devices_per_process=2",
      "--grace_seconds=5",
      "--",
      "--config=configs/digits_cnn.py:smoke",
      f"--workdir={workdir}",
      "--config.train.num_steps=100",
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, "PYTHON": sys.executable, watchdog.STALL_INJECTION_ENV: "3:600"},
  )
  try:
    _wait_for(launcher, "Injected stall")
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=120)[0]
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode != 0
  assert "still running 5s after SIGTERM; sending SIGKILL" in output, output[-3000:]
  deadline = time.monotonic() + 30
  while _processes_with(str(workdir)) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not _processes_with(str(workdir))


def _processes_with(text: str) -> list[int]:
  """Pids of processes whose command line contains `text`."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if text.encode() in f.read():
          found.append(int(pid))
    except OSError:
      continue
  return found


def test_cluster_detection_and_flags():
  assert distributed.detected_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == "SLURM"
  assert distributed.detected_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "Cloud TPU"
  assert not distributed.should_initialize(distributed.DistributedOptions(), {})
  assert distributed.should_initialize(distributed.DistributedOptions(num_processes=2), {})
  assert not distributed.should_initialize(
    distributed.DistributedOptions(enabled=False), {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}
  )
  with pytest.raises(
    ValueError, match="--num_processes given without --coordinator_address, --process_id"
  ):
    distributed.initialize(distributed.DistributedOptions(num_processes=2), {})
  slurm = {"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}
  assert distributed.slurm_local_device_ids(slurm) == list(range(8))
  assert distributed.slurm_local_device_ids({**slurm, "SLURM_NTASKS_PER_NODE": "8"}) is None


@pytest.mark.parametrize(
  "args, message",
  [
    (["--num_processes=0", "--", "--workdir=x"], "positive integers"),
    (["--devices_per_process=x", "--", "--workdir=x"], "positive integers"),
    (["--num_processes=2"], "no trainer arguments"),
    (["--config=configs/digits_cnn.py"], "unknown argument '--config=configs/digits_cnn.py'"),
  ],
)
def test_launcher_rejects_bad_arguments(args, message):
  proc = subprocess.run([LAUNCHER, *args], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2
  assert message in proc.stderr


# The default config's `cnn` (not the smoke `cnn_tiny`), with the host free to run ahead: logs,
# evals and checkpoints only at the end. Before the trainer bounded its steps in flight, this
# aborted before step 300 on 2 cores (2 of 2 runs; docs/cpu_collective_deadlock.md). The full
# 1,500-step runs, also in 2 processes, are bench/full_mesh_runs.sh.
def _run_ahead(num_steps):
  keys = ("train.num_steps", "train.log_every_steps", "eval.every_steps", "checkpoint.every_steps")
  return dict.fromkeys(keys, num_steps)


def test_default_config_on_eight_devices_in_one_process_does_not_deadlock(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "trainer.main",
      "--config=configs/digits_cnn.py",
      f"--workdir={tmp_path}",
      "--config.mesh.data=2",
      "--config.mesh.fsdp=4",
      *_flags(_run_ahead(300)),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "training done at step 300" in proc.stdout


@pytest.mark.parametrize("devices_per_process", [2, 4])
def test_default_config_in_two_processes_trains_to_the_end(tmp_path, devices_per_process):
  """2 processes x 2 or x 4 devices (data mesh): this hung before step 100 (the deadlock) and
  then after the final eval (the end-of-run report's checkpoint barrier)."""
  proc = subprocess.run(
    [
      LAUNCHER,
      "--num_processes=2",
      f"--devices_per_process={devices_per_process}",
      "--grace_seconds=5",
      "--",
      "--config=configs/digits_cnn.py",
      f"--workdir={tmp_path}",
      *_flags(_run_ahead(100)),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    env={**os.environ, "PYTHON": sys.executable},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "training done at step 100" in proc.stdout, proc.stdout[-3000:]
  assert (tmp_path / "report" / "report.md").exists()
