"""The cluster launchers: argument handling and what they would run (no cluster needed)."""

import os
import subprocess

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")


def _run(args, env=None):
  return subprocess.run(
    args, capture_output=True, text=True, timeout=30, cwd=REPO, env={**os.environ, **(env or {})}
  )


def test_sbatch_script_runs_one_trainer_per_node_through_srun(tmp_path):
  fake_srun = tmp_path / "srun"
  fake_srun.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
  fake_srun.chmod(0o755)
  log = tmp_path / "srun.log"
  proc = _run(
    [
      "bash",
      "scripts/slurm/train.sbatch",
      "configs/lm.py:size=350m",
      "/shared/run",
      "--config.seed=3",
    ],
    env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "SRUN_LOG": str(log)},
  )
  assert proc.returncode == 0, proc.stderr
  args = log.read_text().splitlines()
  assert "--kill-on-bad-exit=1" in args
  # The step takes the job's allocation: no task-layout option srun would override or ignore.
  srun_options, python = args[:-6], args[-6]
  assert python.endswith("python") and "--wait=60" in srun_options
  assert not [a for a in srun_options if a.startswith(("--ntasks", "--nodes", "--gpus", "--cpus"))]
  assert args[-5:] == [
    "-m",
    "trainer.main",
    "--config=configs/lm.py:size=350m",
    "--workdir=/shared/run",
    "--config.seed=3",
  ]
  with open(os.path.join(SCRIPTS, "slurm", "train.sbatch")) as f:
    header = f.read()
  assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --signal=TERM@" in header
  # The GPU defaults and, next to them, the override a CPU or test cluster needs.
  assert "#SBATCH --gpus-per-node=8" in header and "#SBATCH --cpus-per-task=" in header
  assert "sbatch --gpus-per-node=0 --cpus-per-task=2" in header


def test_sbatch_script_usage_errors():
  proc = _run(["bash", "scripts/slurm/train.sbatch", "configs/lm.py"])
  assert (
    proc.returncode == 2
    and "usage: sbatch scripts/slurm/train.sbatch CONFIG WORKDIR" in proc.stderr
  )


def test_tpu_script_runs_the_same_command_on_all_workers():
  proc = _run(
    [
      "scripts/tpu/train.sh",
      "--dry_run",
      "my-tpu-v5p-32",
      "configs/lm.py:size=1.3b",
      "gs://b/run",
      "--config.seed=1",
    ],
    env={"ZONE": "us-east5-a"},
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert out.startswith("gcloud compute tpus tpu-vm ssh my-tpu-v5p-32 --worker=all")
  assert "--zone=us-east5-a" in out
  for part in (
    "--distributed=true",
    "--config=configs/lm.py:size=1.3b",
    "--workdir=gs://b/run",
    "--config.seed=1",
  ):
    assert part in out.replace("\\", ""), part
  usage = _run(["scripts/tpu/train.sh", "my-tpu"])
  assert usage.returncode == 2 and "usage:" in usage.stderr


def test_kubernetes_manifest_wires_the_coordinator_service():
  with open(os.path.join(SCRIPTS, "k8s", "train-jobset.yaml")) as f:
    service, job = list(yaml.safe_load_all(f))
  assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
  spec = job["spec"]
  pod = spec["template"]["spec"]
  assert spec["completionMode"] == "Indexed"
  assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
  assert pod["subdomain"] == service["metadata"]["name"]
  container = pod["containers"][0]
  env = {e["name"]: e for e in container["env"]}
  assert int(env["NUM_PROCESSES"]["value"]) == spec["parallelism"] == spec["completions"]
  assert "job-completion-index" in env["PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
  coordinator = next(a for a in container["args"] if a.startswith("--coordinator_address="))
  host, port = coordinator.split("=", 1)[1].split(":")
  assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
  assert int(port) == service["spec"]["ports"][0]["port"]
  assert "--process_id=$(PROCESS_ID)" in container["args"]
