"""Every CLI the README documents answers `--help` with its flags: no traceback, no `error:`.

absl's app.run exits 1 after printing help (its convention); the CLIs that parse their own
FlagValues (mlops/cli_help.py) and the argparse ones exit 0. Each runs in its own interpreter,
all at once, as a user would start them.
"""

import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (command after `python -m`, exit status, strings its help must list).
_CLIS = [
  ("trainer.main", 1, ["--config", "--workdir"]),
  ("serving.export", 1, ["--workdir", "--export_base"]),
  ("serving.server", 1, ["--model_base_path", "--rest_api_port", "--traffic_config_file"]),
  ("serving.router", 1, ["--backend", "--port"]),
  ("serving.client", 1, ["--server", "--model"]),
  ("serving.batch_predict", 1, ["--saved_model", "--num_actors", "--output"]),
  ("mlops.registry", 0, ["register", "promote", "rollback"]),
  ("mlops.validate", 0, ["--candidate", "--baseline"]),
  ("mlops.hpo", 1, ["--n_trials", "--storage"]),
  ("mlops.report", 1, ["--workdir", "--compare"]),
  ("mlops.monitor", 1, ["--logs", "--window"]),
  ("mlops.profile", 1, ["--saved_model"]),
  ("mlops.pipeline", 0, ["run", "watch"]),
  ("mlops.abtest", 0, ["--logs", "--mde", "--sequential"]),
  ("mlops.shadow_report", 0, ["--logs", "--top"]),
  ("mlops.feedback", 0, ["import FILE", "--logs"]),
  ("mlops.rollout", 0, ["manifests", "canary"]),
  ("mlops.rollout canary", 0, ["--candidate", "--logs"]),
  ("mlops.rollout manifests", 0, ["--stable", "--mesh"]),
]


@pytest.fixture(scope="module")
def help_outputs() -> dict[str, subprocess.CompletedProcess]:
  """Each CLI's `--help`, run side by side (bounded: 180 s for all)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = {
    cli: subprocess.Popen(
      [sys.executable, "-m", *cli.split(), "--help"],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for cli, _, _ in _CLIS
  }
  deadline = time.monotonic() + 180
  outputs = {}
  try:
    for cli, proc in procs.items():
      out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      outputs[cli] = subprocess.CompletedProcess(proc.args, proc.returncode, out)
  finally:
    for proc in procs.values():
      proc.kill()
  return outputs


@pytest.mark.parametrize("cli, status, listed", _CLIS, ids=[c for c, _, _ in _CLIS])
def test_help_lists_the_flags(help_outputs, cli, status, listed):
  result = help_outputs[cli]
  refusal = re.search(r"^(Traceback|error:)", result.stdout, re.M)  # Docstrings may say "error:".
  assert refusal is None, result.stdout[-2000:]
  assert result.returncode == status, result.stdout[-2000:]
  missing = [text for text in listed if text not in result.stdout]
  assert not missing, f"{cli} --help does not list {missing}:\n{result.stdout[-3000:]}"
