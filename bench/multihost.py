r"""One process with 8 devices against 2 processes with 4 each, on one machine (issue 6).

  .venv/bin/python bench/multihost.py          # default: about 2 minutes on 2 CPU cores
  .venv/bin/python bench/multihost.py --quick  # sanity run, under a minute

Both layouts run the same global job, `configs/digits_cnn.py:smoke` (the tiny CNN, global batch
32) over 8 fake CPU devices (`--xla_force_host_platform_device_count`, which must be set before JAX
starts, so every run is a fresh process). The 2-process runs use scripts/launch_local.sh:
jax.distributed on localhost, collectives over gloo.

Part 1: steps/s of `python -m trainer.main` for `--num_steps` steps (logging every
`--log_every_steps`, eval and checkpoint only at the end), read from process 0's TensorBoard
`perf/steps_per_sec` events: the steps of all logged intervals over their time (compilation
excluded: the trainer's rate starts after the first step), on each mesh of `--meshes`: `fsdp`
(data=2 x fsdp=rest: parameters sharded, gathered for every layer; the mesh of
tests/test_multihost.py) and `data` (data=all: parameters replicated, one gradient all-reduce a
step), for each of `--layouts` (the first is the baseline). Layouts alternate, `--repeats` runs
each. A run that outlives `--timeout_s` is killed and fails the benchmark. (Before the trainer
bounded its steps in flight, 2 processes x 4 devices deadlocked on `data` in most runs:
docs/cpu_collective_deadlock.md.) Issue 16's row, the default config on 4 devices:

  .venv/bin/python bench/multihost.py --config=configs/digits_cnn.py --layouts=1x4,2x2 \
      --meshes=data --num_steps=1500 --log_every_steps=100 --repeats=1 --skip_checkpoints \
      --timeout_s=900

Part 2: checkpoints on the fsdp mesh. This script, as a worker in each layout, builds the same
experiment and `--ckpt_repeats` times runs a train step, then times `Checkpointer.save` (async, as
in training: how long it blocks, and until `wait_until_finished` returns), then
`Checkpointer.restore` of that step onto the sharded abstract state (until the arrays are ready).
Times are process 0's; every process takes part in every save and restore.

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import harness
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "scripts", "launch_local.sh")
CONFIG = "configs/digits_cnn.py:smoke"
# (processes, devices per process); both give the same 8-device mesh.
LAYOUTS = ((1, 8), (2, 4))

_QUICK = flags.DEFINE_bool("quick", False, "Sanity run: fewer steps, one repeat.")
_CONFIG = flags.DEFINE_string("config", CONFIG, "Trainer config of part 1.")
_LAYOUTS = flags.DEFINE_list(
  "layouts", ["1x8", "2x4"], "Part 1 layouts, PROCESSESxDEVICES; the first is the baseline."
)
_SKIP_CHECKPOINTS = flags.DEFINE_bool("skip_checkpoints", False, "Run part 1 only.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 200, "Train steps per run (part 1).")
_LOG_EVERY = flags.DEFINE_integer("log_every_steps", 50, "Logging interval (part 1).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each layout on each mesh (part 1).")
_MESHES = flags.DEFINE_list(
  "meshes", ["fsdp"], "Part 1 meshes: fsdp, data (2 processes deadlock in most runs on data)."
)
_TIMEOUT_S = flags.DEFINE_integer(
  "timeout_s", 180, "A run taking longer is killed and the benchmark fails (part 1 and 2)."
)
_CKPT_REPEATS = flags.DEFINE_integer("ckpt_repeats", 5, "Timed saves and restores (part 2).")
_TMP_ROOT = flags.DEFINE_string("tmp_root", None, "Where workdirs go (default: system temp).")
# Internal: run part 2's checkpoint worker in this process.
_WORKER = flags.DEFINE_string("worker", None, "(internal) checkpoint worker's workdir.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "(internal) for --worker.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "(internal) for --worker.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "(internal) for --worker.")

# Mesh name -> config overrides; both use all 8 devices.
MESHES = {
  "fsdp": {"mesh.data": 2, "mesh.fsdp": -1},
  "data": {"mesh.data": -1, "mesh.fsdp": 1},
}


@dataclasses.dataclass(frozen=True)
class CheckpointTiming:
  save_blocking_ms: list[float]
  save_total_ms: list[float]
  restore_ms: list[float]
  checkpoint_bytes: int


def parse_layout(text: str) -> tuple[int, int]:
  """`"2x4"` -> (2 processes, 4 devices each)."""
  processes, _, devices = text.partition("x")
  if not (processes.isdigit() and devices.isdigit()):
    raise app.UsageError(f"layout {text!r} is not PROCESSESxDEVICES, e.g. 2x4")
  return int(processes), int(devices)


def layout_name(layout: tuple[int, int]) -> str:
  return f"{layout[0]} process{'es' if layout[0] > 1 else ''} x {layout[1]} devices"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _device_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(commands: list[list[str]], env: dict[str, str], what: str) -> list[str]:
  """Runs `commands` side by side, each in its own process group; returns their stdouts.

  A run that outlives `--timeout_s` (a multi-process deadlock, see the module docstring) is
  killed with all its children, and so is every run when one fails.
  """
  procs = [
    subprocess.Popen(
      command,
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
    )
    for command in commands
  ]
  deadline = time.monotonic() + _TIMEOUT_S.value
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1)))
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"{what} did not finish within {_TIMEOUT_S.value} s; killed it") from e
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  for proc, (out, err) in zip(procs, outputs, strict=True):
    if proc.returncode:
      raise RuntimeError(f"{what} failed with status {proc.returncode}:\n{(out + err)[-4000:]}")
  return [out for out, _ in outputs]


# --- Part 1 -------------------------------------------------------------------------------------


def run_training(
  layout: tuple[int, int], mesh: str, workdir: str, num_steps: int, log_every: int
) -> float:
  """Trains in `layout` on `mesh` and returns the steps/s process 0 logged to TensorBoard."""
  processes, devices = layout
  # The smoke config logs, evals and saves every few steps; here only logging is periodic.
  overrides = {
    **MESHES[mesh],
    "train.num_steps": num_steps,
    "train.log_every_steps": log_every,
    "eval.every_steps": num_steps,
    "checkpoint.every_steps": num_steps,
  }
  trainer_args = [f"--config={_CONFIG.value}", f"--workdir={workdir}"] + [
    f"--config.{key}={value}" for key, value in overrides.items()
  ]
  if processes == 1:
    command = [sys.executable, "-m", "trainer.main", *trainer_args]
    env = _device_env(devices)
  else:
    command = [
      LAUNCHER,
      f"--num_processes={processes}",
      f"--devices_per_process={devices}",
      "--",
      *trainer_args,
    ]
    env = dict(os.environ, PYTHON=sys.executable)
  _run([command], env, f"training in {layout_name(layout)} on the {mesh} mesh")
  return logged_steps_per_sec(workdir)


def logged_steps_per_sec(workdir: str) -> float:
  """Steps over seconds of all intervals in the `perf/steps_per_sec` events of `workdir`."""
  # TensorBoard's reader imports TensorFlow when it is installed; keep its C++ logs quiet.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  scalars = events.Scalars("perf/steps_per_sec")
  steps, seconds, previous = 0, 0.0, 1  # The trainer's rate starts after step 1 (compiling).
  for event in scalars:
    interval = event.step - previous
    steps, seconds, previous = steps + interval, seconds + interval / event.value, event.step
  if not steps:
    raise RuntimeError(f"no perf/steps_per_sec events in {workdir}")
  return steps / seconds


# --- Part 2 -------------------------------------------------------------------------------------


def checkpoint_worker(workdir: str, repeats: int) -> CheckpointTiming | None:
  """Times saves and restores; every process of the layout runs this. Returns on process 0."""
  import jax

  from configs import digits_cnn
  from trainer import checkpointing, distributed, train

  distributed.initialize(
    distributed.DistributedOptions(
      enabled=_NUM_PROCESSES.value > 1,
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  )
  from jax.experimental import multihost_utils

  config = digits_cnn.get_config("smoke")
  config.mesh.data, config.mesh.fsdp = MESHES["fsdp"]["mesh.data"], MESHES["fsdp"]["mesh.fsdp"]
  config.checkpoint.keep_best = 0
  experiment = train.build_experiment(config)
  state = experiment.init_state(jax.random.PRNGKey(config.seed))
  data_iterator = experiment.train_iterator()
  checkpointer = checkpointing.Checkpointer(
    workdir, config.checkpoint, best_metric="eval/accuracy", best_mode="max"
  )
  blocking, total, restore = [], [], []
  try:
    # Round 0 warms up (directories, Orbax's threads, restore's compiled reshards).
    for round_index in range(repeats + 1):
      state, metrics = experiment.train_step(state, next(data_iterator))
      jax.block_until_ready((state, metrics))
      multihost_utils.sync_global_devices(f"save {round_index}")
      start = time.perf_counter()
      checkpointer.save(state, data_iterator, config)
      returned = time.perf_counter()
      checkpointer.wait_until_finished()
      finished = time.perf_counter()
      step = checkpointer.latest_step()
      multihost_utils.sync_global_devices(f"restore {round_index}")
      restore_start = time.perf_counter()
      restored, _ = checkpointer.restore(step, experiment.abstract_state, data_iterator)
      jax.block_until_ready(restored)
      restored_at = time.perf_counter()
      if round_index:
        blocking.append(1e3 * (returned - start))
        total.append(1e3 * (finished - start))
        restore.append(1e3 * (restored_at - restore_start))
    size = sum(
      os.path.getsize(path)
      for path in glob.glob(
        os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "**"), recursive=True
      )
      if os.path.isfile(path)
    )
  finally:
    checkpointer.close()
    data_iterator.close()
  if jax.process_index():
    return None
  return CheckpointTiming(blocking, total, restore, size)


def run_checkpoint_worker(layout: tuple[int, int], workdir: str, repeats: int) -> CheckpointTiming:
  """Runs `checkpoint_worker` in every process of `layout`; returns process 0's timings."""
  processes, devices = layout
  port = _free_port()
  commands = [
    [
      sys.executable,
      os.path.abspath(__file__),
      f"--worker={workdir}",
      f"--ckpt_repeats={repeats}",
      f"--num_processes={processes}",
      f"--process_id={i}",
      f"--coordinator_address=127.0.0.1:{port}",
    ]
    for i in range(processes)
  ]
  outputs = _run(commands, _device_env(devices), f"checkpoint workers in {layout_name(layout)}")
  return CheckpointTiming(**json.loads(outputs[0].strip().splitlines()[-1]))


# --- Reporting ----------------------------------------------------------------------------------


def report_training(rates: dict[str, dict[tuple[int, int], list[float]]], num_steps: int) -> str:
  """One table row per mesh and layout; `rates[mesh][layout]` are the runs' steps/s, the first
  layout is the baseline of the ratios."""
  single, *others = next(iter(rates.values()))
  rows, ratios = [], []
  for mesh, by_layout in rates.items():
    medians = {layout: statistics.median(values) for layout, values in by_layout.items()}
    overrides = ", ".join(f"{k.removeprefix('mesh.')}={v}" for k, v in MESHES[mesh].items())
    for layout, values in by_layout.items():
      rows.append(
        [
          f"{mesh} ({overrides})",
          layout_name(layout),
          f"{medians[layout]:.1f}",
          f"{1e3 / medians[layout]:.2f}",
          f"{medians[layout] / medians[single]:.3f}",
          ", ".join(f"{v:.1f}" for v in values),
        ]
      )
    ratios += [
      f"{mesh}: {layout_name(multi)} / {layout_name(single)} = "
      f"{medians[multi] / medians[single]:.3f}"
      for multi in others
    ]
  repeats = len(next(iter(rates.values()))[single])
  return "\n".join(
    [
      f"Part 1: {_CONFIG.value}, {num_steps} steps per run, {repeats} runs of each "
      "layout on each mesh, alternating; steps/s after the first step",
      "",
      harness.table(
        [
          "mesh",
          "layout",
          "median steps/s",
          "ms/step",
          f"/ {layout_name(single)}",
          "runs (steps/s)",
        ],
        rows,
      ),
      "",
      *ratios,
    ]
  )


def report_checkpoints(timings: dict[tuple[int, int], CheckpointTiming]) -> str:
  rows = []
  for layout, timing in timings.items():
    rows.append(
      [
        layout_name(layout),
        f"{timing.checkpoint_bytes / 2**10:.0f}",
        f"{statistics.median(timing.save_blocking_ms):.1f}",
        f"{statistics.median(timing.save_total_ms):.1f}",
        f"{statistics.median(timing.restore_ms):.1f}",
        ", ".join(f"{v:.0f}" for v in timing.save_total_ms),
        ", ".join(f"{v:.0f}" for v in timing.restore_ms),
      ]
    )
  repeats = len(next(iter(timings.values())).restore_ms)
  return "\n".join(
    [
      f"Part 2: checkpoints of {CONFIG} (async save), median of {repeats} (ms, process 0)",
      "",
      harness.table(
        [
          "layout",
          "checkpoint KiB",
          "save() blocks",
          "save + wait_until_finished",
          "restore",
          "runs, save + wait",
          "runs, restore",
        ],
        rows,
      ),
    ]
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    harness.quiet_logs()
    timing = checkpoint_worker(_WORKER.value, _CKPT_REPEATS.value)
    if timing:
      print(json.dumps(dataclasses.asdict(timing)))
    return
  num_steps, repeats, ckpt_repeats = _NUM_STEPS.value, _REPEATS.value, _CKPT_REPEATS.value
  if _QUICK.value:
    num_steps, repeats, ckpt_repeats = 100, 1, 2
  log_every = min(_LOG_EVERY.value, num_steps)
  meshes = list(_MESHES.value)
  unknown = set(meshes) - set(MESHES)
  if unknown:
    raise app.UsageError(f"unknown meshes {sorted(unknown)}; choose from {sorted(MESHES)}")
  layouts = [parse_layout(text) for text in _LAYOUTS.value]
  harness.quiet_logs()

  tmp_root = tempfile.mkdtemp(prefix="multihost_", dir=_TMP_ROOT.value)
  wall_start = time.perf_counter()
  load_before = harness.load_average()
  try:
    rates = {mesh: {layout: [] for layout in layouts} for mesh in meshes}
    for repeat in range(repeats):
      for mesh in meshes:
        for layout in layouts:
          workdir = tempfile.mkdtemp(prefix="train_", dir=tmp_root)
          rates[mesh][layout].append(run_training(layout, mesh, workdir, num_steps, log_every))
          shutil.rmtree(workdir, ignore_errors=True)
        print(
          f"repeat {repeat + 1}/{repeats}, mesh {mesh}: "
          + ", ".join(f"{layout_name(k)} {v[-1]:.1f}" for k, v in rates[mesh].items())
          + f" steps/s (load {harness.load_average()})",
          flush=True,
        )
    timings = {}
    for layout in [] if _SKIP_CHECKPOINTS.value else LAYOUTS:
      workdir = tempfile.mkdtemp(prefix="ckpt_", dir=tmp_root)
      timings[layout] = run_checkpoint_worker(layout, workdir, ckpt_repeats)
      print(f"{layout_name(layout)}: checkpoints timed", flush=True)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)

  print()
  harness.print_run_header(load_before, devices=False)
  print()
  print(report_training(rates, num_steps))
  if timings:
    print()
    print(report_checkpoints(timings))
  print(f"\ntotal benchmark time: {time.perf_counter() - wall_start:.0f} s")


if __name__ == "__main__":
  app.run(main)
