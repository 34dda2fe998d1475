r"""Wall time of one `python -m serving.client` call: --help, and one gRPC Predict, against the
client before it stopped importing TensorFlow (commit 90a4ad3), in the same run.

  .venv/bin/python bench/client_startup.py [--model_base_path=runs/models/digits] [--repeats=5]

Starts the model server on --model_base_path (or on a digits smoke model it trains and exports
into a temporary directory), then runs each command `--repeats` times, alternating old and new so
that drift in the machine's load hits both alike, and prints the median and the ratio. Each call
is a fresh interpreter, as a user's shell runs it. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.helpers import model_server  # noqa: E402

_BASE = flags.DEFINE_string("model_base_path", None, "An export base; default: export a smoke run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Calls of each command.")
_OLD_COMMIT = flags.DEFINE_string(
  "old_commit", "90a4ad3", "Commit whose serving/client.py (TF runtime imported) is the baseline."
)


def _export_smoke_model(root: str) -> str:
  from serving.export import exporter
  from tests.helpers.configs import smoke_config
  from trainer import train

  train.train_and_evaluate(smoke_config({}), os.path.join(root, "run"))
  base = os.path.join(root, "models", "digits")
  exporter.export(os.path.join(root, "run"), base)
  return base


def _seconds(command: list[str]) -> tuple[float, float]:
  """(wall, CPU) seconds of one run of `command`; CPU (user + system) is what a busy machine
  does not inflate."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  if proc.returncode not in ((0, 1) if "--help" in command else (0,)):  # absl: --help exits 1
    raise RuntimeError(f"{command} failed:\n{proc.stderr[-2000:]}")
  return seconds, cpu


def _commands(root: str, port: int) -> dict[str, tuple[list[str], list[str]]]:
  """{what: (old command, new command)}."""
  old_client = os.path.join(root, "old_client.py")
  source = subprocess.run(
    ["git", "show", f"{_OLD_COMMIT.value}:serving/client.py"],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  with open(old_client, "w") as f:
    f.write(source)
  request = os.path.join(root, "request.json")
  with open(request, "w") as f:
    json.dump({"inputs": model_server.digits_pixels(2).tolist()}, f)
  predict = [f"--server=127.0.0.1:{port}", "--model=digits", f"--input={request}"]
  old, new = [sys.executable, old_client], [sys.executable, "-m", "serving.client"]
  return {
    "`serving.client --help`": ([*old, "--help"], [*new, "--help"]),
    "`serving.client --input=...`: one Predict of 2 digits": ([*old, *predict], [*new, *predict]),
  }


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as root:
    base = _BASE.value or _export_smoke_model(root)
    log = os.path.join(root, "server.log")
    with model_server.Server([f"--model_base_path={base}", "--model_name=digits"], log) as server:
      commands = _commands(root, server.grpc_port)
      times = {what: ([], []) for what in commands}
      for _ in range(_REPEATS.value):
        for what, (old, new) in commands.items():
          times[what][0].append(_seconds(old))
          times[what][1].append(_seconds(new))
  load = os.getloadavg()[0]
  print(
    f"cpus: {os.cpu_count()}, load average {load:.1f}; {_REPEATS.value} calls each, alternating"
  )
  print(
    f"| command | before ({_OLD_COMMIT.value}, imports TensorFlow): wall / CPU s | now: wall / CPU s"
    " | now / before (wall, CPU) |"
  )
  print("|---|---|---|---|")
  for what, (old, new) in times.items():
    (old_wall, old_cpu), (new_wall, new_cpu) = (
      [statistics.median(column) for column in zip(*runs, strict=True)] for runs in (old, new)
    )
    print(
      f"| {what} | {old_wall:.2f} / {old_cpu:.2f} | {new_wall:.2f} / {new_cpu:.2f} | "
      f"{new_wall / old_wall:.2f}, {new_cpu / old_cpu:.2f} |"
    )


if __name__ == "__main__":
  app.run(main)
