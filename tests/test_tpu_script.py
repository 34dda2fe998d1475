"""scripts/tpu/train.sh: `--dry_run` anywhere prints the command and never runs gcloud."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIONAL = ["my-tpu-v5p-32", "configs/lm.py:size=1.3b", "gs://b/run"]


@pytest.fixture
def fake_gcloud(tmp_path):
  """A `gcloud` first on PATH that records its arguments, one per line, in the returned file."""
  log = tmp_path / "gcloud.log"
  script = tmp_path / "gcloud"
  script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {shlex.quote(str(log))}\n')
  script.chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "ZONE": "us-east5-a"}
  return log, env


def _train_sh(args, env):
  return subprocess.run(
    ["bash", "scripts/tpu/train.sh", *args],
    capture_output=True,
    text=True,
    timeout=30,
    cwd=REPO,
    env=env,
  )


@pytest.mark.parametrize("position", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("spelling", ["--dry_run", "--dry-run", "--dryrun", "--dry_run=maybe"])
def test_a_dry_run_anywhere_prints_and_runs_nothing(fake_gcloud, position, spelling):
  log, env = fake_gcloud
  args = [*POSITIONAL, "--config.seed=1"]
  args.insert(position, spelling)
  proc = _train_sh(args, env)
  assert proc.returncode == 0, proc.stderr
  assert not log.exists(), "gcloud ran during a dry run"
  printed = shlex.split(proc.stdout)
  assert printed[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu-v5p-32"]
  assert "--worker=all" in printed and "--zone=us-east5-a" in printed
  remote = next(a for a in printed if a.startswith("--command="))
  assert remote.endswith(
    "trainer.main --distributed=true --config=configs/lm.py:size=1.3b --workdir=gs://b/run"
    " --config.seed=1"
  ), remote
  assert "dry" not in remote


def test_without_dry_run_gcloud_gets_what_a_dry_run_prints(fake_gcloud):
  log, env = fake_gcloud
  args = [*POSITIONAL, "--config.seed=1", "--config.train.num_steps=5"]
  printed = shlex.split(_train_sh([*args, "--dry_run"], env).stdout)
  proc = _train_sh([*args, "--dry_run=false"], env)
  assert proc.returncode == 0, proc.stderr
  assert ["gcloud", *log.read_text().splitlines()] == printed


def test_too_few_arguments_print_usage_and_run_nothing(fake_gcloud):
  log, env = fake_gcloud
  proc = _train_sh(["my-tpu", "--dry_run", "configs/lm.py"], env)
  assert proc.returncode == 2 and proc.stderr.startswith("usage: scripts/tpu/train.sh")
  assert not log.exists()
