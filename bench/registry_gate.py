"""The registry's costs: the validation gate's wall time (digits and lm_tiny smoke models, the
first version alone and the second against it), and promote / rollback time from the command to
the server answering the label with the new version.

  python bench/registry_gate.py [--repeats=3]

Each model is a smoke run registered twice (two checkpoints of one run); everything lives in a
temporary MLflow store and export base. Promote and rollback run as the CLI does (a fresh
`python -m mlops.registry` process, --server given), and in process (the move alone).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness

from configs import digits_cnn, lm
from tests.helpers import model_server

REPO = model_server.REPO


def _models():
  digits = digits_cnn.get_config("smoke")
  digits.checkpoint.every_steps = 10
  lm_tiny = lm.get_config("size=tiny,smoke")
  lm_tiny.train.num_steps = 20
  lm_tiny.checkpoint.every_steps = 10
  lm_tiny.eval.every_steps = 10
  lm_tiny.data.eval_every_documents = 4  # The smoke corpus's 13 documents: some in every split.
  for config in (digits, lm_tiny):
    config.data.worker_threads = 0
  return {
    "digits": (digits, "configs/gates/smoke.py"),
    "lm_tiny": (lm_tiny, "configs/gates/lm.py"),
  }


def _cpu_seconds() -> float:
  """CPU seconds of this process and its finished children (a loaded machine inflates wall
  time, not these)."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def gate_times(root: str) -> list[list[str]]:
  from mlops import registry_register, registry_store, validate
  from trainer import train

  rows = []
  for name, (config, gate) in _models().items():
    workdir = os.path.join(root, f"run_{name}")
    train.train_and_evaluate(config, workdir)
    base = os.path.join(root, "models", name)
    client = registry_store.client()
    for step in ("10", "20"):
      registry_register.register(client, workdir, base, name, step)
    for candidate, baseline in ((1, "production"), (2, "1")):
      start, cpu = time.perf_counter(), _cpu_seconds()
      record = validate.validate(client, name, candidate, baseline, os.path.join(REPO, gate))
      seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
      against = "none (absolute checks)" if record["baseline"] is None else "version 1"
      rows.append(
        [
          name,
          str(candidate),
          against,
          str(len(record["checks"])),
          record["verdict"],
          f"{seconds:.1f}",
          f"{cpu:.1f}",
        ]
      )
  return rows


def _cli(*args: str) -> tuple[float, float]:
  """(wall, CPU) seconds of one `python -m mlops.registry` command; raises with its stderr."""
  # The bench's own temporary store, not the user's registry.
  env = {
    **model_server.SERVER_ENV,
    "PYTHONPATH": REPO,
    "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
  }
  start, cpu = time.perf_counter(), _cpu_seconds()
  proc = subprocess.run(
    [sys.executable, "-m", "mlops.registry", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  if proc.returncode != 0:
    raise RuntimeError(f"mlops.registry {' '.join(args)} failed: {proc.stderr[-2000:]}")
  return time.perf_counter() - start, _cpu_seconds() - cpu


def _timed(move) -> tuple[float, float]:
  start, cpu = time.perf_counter(), _cpu_seconds()
  move()
  return time.perf_counter() - start, _cpu_seconds() - cpu


def promote_times(root: str, repeats: int) -> list[list[str]]:
  from mlops import registry_promote, registry_serving, registry_store

  client = registry_store.client()
  config = os.path.join(root, "models.config")
  # The move is what is timed, not the gate (which the first table times): whether version 2
  # beat version 1 does not matter here, so the moves are forced (and audited as forced).
  registry_promote.promote(client, "digits", 1, "staging", model_config_file=config, force=True)
  rows = []
  with model_server.Server(
    [f"--model_config_file={config}"], os.path.join(root, "server.log"), model_name="digits"
  ) as server:
    address = f"127.0.0.1:{server.grpc_port}"
    where = [f"--model_config_file={config}", f"--server={address}", "--name=digits"]
    cli = {"promote": [], "rollback": []}
    in_process = {"promote": [], "rollback": []}
    for _ in range(repeats):
      cli["promote"].append(
        _cli("promote", "--version=2", "--alias=staging", "--force", "--reason=bench", *where)
      )
      assert registry_serving.served_version(address, "digits", "staging") == 2
      cli["rollback"].append(_cli("rollback", "--alias=staging", *where))
      assert registry_serving.served_version(address, "digits", "staging") == 1
      in_process["promote"].append(
        _timed(
          lambda: registry_promote.promote(
            client, "digits", 2, "staging", model_config_file=config, server=address, force=True
          )
        )
      )
      in_process["rollback"].append(
        _timed(lambda: registry_promote.rollback(client, "digits", "staging", server=address))
      )
  for kind in ("promote", "rollback"):
    rows.append([kind, "CLI (new process)", _stats(cli[kind])])
    rows.append([kind, "in process", _stats(in_process[kind])])
  return rows


def _stats(samples: list[tuple[float, float]]) -> str:
  walls = sorted(w for w, _ in samples)
  cpus = sorted(c for _, c in samples)
  return (
    f"wall median {walls[len(walls) // 2]:.2f} s (min {walls[0]:.2f}, max {walls[-1]:.2f}); "
    f"CPU median {cpus[len(cpus) // 2]:.2f} s"
  )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  harness.quiet_logs()
  load = harness.load_average()
  with tempfile.TemporaryDirectory(prefix="bench_registry_") as root:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    gates = gate_times(root)
    print(
      harness.table(
        ["model", "candidate", "baseline", "checks", "verdict", "wall s", "CPU s"], gates
      ),
      flush=True,
    )
    moves = promote_times(root, args.repeats)
  harness.print_run_header(load, devices=False)
  print()
  print(harness.table(["move", "how", "command -> label answers the new version"], moves))


if __name__ == "__main__":
  main()
