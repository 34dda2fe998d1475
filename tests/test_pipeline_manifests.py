"""The cluster and CI files of continuous training: the Argo WorkflowTemplate (train -> register
-> validate -> promote), the CronJob for `watch`, and .github/workflows/ml.yml. Each container's
command is parsed by the real CLI's parser, so a renamed flag or module fails here."""

import os
import re

import pytest
import yaml

from mlops import pipeline, registry, validate
from tests.helpers import model_server

REPO = model_server.REPO
K8S = os.path.join(REPO, "scripts", "k8s")
# Placeholder values for Argo's {{...}} expressions, so the arguments parse.
ARGO_VALUES = {
  "workflow.parameters.name": "digits",
  "workflow.parameters.config": "configs/digits_cnn.py",
  "workflow.parameters.gate": "configs/gates/digits.py",
  "workflow.parameters.export_base": "/runs/models/digits",
  "workflow.parameters.model_config_file": "/runs/models/models.config",
  "workflow.name": "jax-trainer-pipeline-abc12",
  "inputs.parameters.version": "3",
}


def _load(name: str) -> list[dict]:
  with open(os.path.join(K8S, name)) as f:
    return list(yaml.safe_load_all(f))


def _substitute(text: str) -> str:
  def value(match: re.Match) -> str:
    key = match[1].strip()
    assert key in ARGO_VALUES, f"unknown Argo expression {key}"
    return ARGO_VALUES[key]

  return re.sub(r"\{\{([^}]+)\}\}", value, text)


def _check_mounts(pod_spec: dict, container: dict, volumes: list[dict]) -> None:
  declared = {v["name"] for v in volumes}
  for mount in container.get("volumeMounts", []):
    assert mount["name"] in declared, f"{container} mounts undeclared volume {mount['name']}"
  env = {e["name"] for e in container.get("env", [])}
  assert "MLFLOW_TRACKING_URI" in env  # Every step talks to the same registry.


@pytest.fixture(scope="module")
def workflow() -> dict:
  (template,) = _load("pipeline-workflowtemplate.yaml")
  return template


def test_the_workflow_template_runs_the_four_steps_in_order(workflow):
  assert workflow["apiVersion"] == "argoproj.io/v1alpha1" and workflow["kind"] == "WorkflowTemplate"
  spec = workflow["spec"]
  templates = {t["name"]: t for t in spec["templates"]}
  entry = templates[spec["entrypoint"]]
  # Each step group holds one step: sequential, so promote runs only after validate passed.
  assert [[s["name"] for s in group] for group in entry["steps"]] == [
    ["train"],
    ["register"],
    ["validate"],
    ["promote"],
  ]
  for group in entry["steps"]:
    assert "continueOn" not in group[0] and group[0]["template"] in templates
  version = "{{steps.register.outputs.parameters.version}}"
  for step in ("validate", "promote"):
    (group,) = [g for g in entry["steps"] if g[0]["name"] == step]
    assert group[0]["arguments"]["parameters"] == [{"name": "version", "value": version}]
  register = templates["register"]
  assert register["outputs"]["parameters"][0]["name"] == "version"
  assert spec["synchronization"]["mutexes"], "one pipeline at a time"
  declared = {p["name"] for p in spec["arguments"]["parameters"]}
  used = set(re.findall(r"workflow\.parameters\.(\w+)", yaml.safe_dump(spec)))
  assert used <= declared, used - declared


def test_each_step_is_the_local_command(workflow):
  templates = {t["name"]: t for t in workflow["spec"]["templates"]}
  volumes = workflow["spec"]["volumes"]
  commands = {}
  for name in ("train", "register", "validate", "promote"):
    container = templates[name]["container"]
    _check_mounts(workflow["spec"], container, volumes)
    commands[name] = [*container["command"], *(_substitute(a) for a in container["args"])]
  train = commands["train"]
  assert train[:3] == ["python", "-m", "trainer.main"]
  assert {a.split("=")[0] for a in train[3:]} == {"--config", "--workdir"}
  assert os.path.isfile(os.path.join(REPO, train[3].split("=", 1)[1]))
  shell = commands["register"]
  assert shell[:2] == ["sh", "-c"]
  register_cli = shell[2].split("|")[0].split()
  assert register_cli[:3] == ["python", "-m", "mlops.registry"]
  args = registry.parser().parse_args(register_cli[3:])
  assert args.command == "register" and args.workdir == train[4].split("=", 1)[1]
  # The version the registry prints is what the sed in the same step extracts.
  sed = re.search(r"sed -n '(.*)' ", shell[2])[1]
  pattern = sed.removeprefix("s/").rsplit("/", 2)[0].replace(r"\(", "(").replace(r"\)", ")")
  assert (
    re.match(pattern, "exported and registered digits version 12: /runs/models/digits/12")[1]
    == "12"
  )
  assert commands["validate"][:3] == ["python", "-m", "mlops.validate"]
  gate = validate.parser().parse_args(commands["validate"][3:])
  assert (gate.candidate, gate.baseline) == (3, "production")
  assert os.path.isfile(os.path.join(REPO, gate.gate))
  promote = registry.parser().parse_args(commands["promote"][3:])
  assert promote.command == "promote" and (promote.version, promote.alias) == (3, "production")
  assert not promote.force  # Promote must keep refusing a version without a passing gate.


def test_the_cronjob_runs_one_guarded_watch_pass():
  (cron,) = _load("pipeline-watch-cronjob.yaml")
  assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
  spec = cron["spec"]
  assert spec["concurrencyPolicy"] == "Forbid"
  assert len(spec["schedule"].split()) == 5
  pod = spec["jobTemplate"]["spec"]["template"]["spec"]
  assert pod["restartPolicy"] == "Never"
  (container,) = pod["containers"]
  _check_mounts(pod, container, pod["volumes"])
  assert container["command"] == ["python", "-m", "mlops.pipeline"]
  args = pipeline.parser().parse_args(container["args"])
  assert args.command == "watch" and args.max_iterations == 1
  assert os.path.isfile(os.path.join(REPO, args.config))
  # The guard state and the lock must outlive the pod: on a mounted volume.
  mounts = [m["mountPath"] for m in container["volumeMounts"]]
  for path in (args.state_file, args.root):
    assert any(path.startswith(m + "/") for m in mounts), path
  logs_mount = next(m for m in container["volumeMounts"] if args.logs.startswith(m["mountPath"]))
  assert logs_mount.get("readOnly") is True


def test_the_ci_workflow_gates_on_the_smoke_pipeline():
  with open(os.path.join(REPO, ".github", "workflows", "ml.yml")) as f:
    ci = yaml.safe_load(f)
  jobs = ci["jobs"]
  assert list(jobs) == ["lint", "test", "gate"]
  assert jobs["test"]["needs"] == "lint" and jobs["gate"]["needs"] == "test"
  runs = {name: [s.get("run", "") for s in job["steps"]] for name, job in jobs.items()}
  assert "make lint" in runs["lint"] and "make test" in runs["test"]
  assert "make pipeline-smoke" in runs["gate"]
  with open(os.path.join(REPO, "Makefile")) as f:
    makefile = f.read()
  target = makefile.split("\npipeline-smoke:", 1)[1].split("\n\n", 1)[0]
  command = target.split("$(BIN)/python -m mlops.pipeline", 1)[1].replace("\\\n", " ").split()
  args = pipeline.parser().parse_args(command)
  assert args.command == "run" and args.promote == "direct" and args.trigger == "ci"
  assert os.path.isfile(os.path.join(REPO, args.gate))
  with open(os.path.join(REPO, ".ci", "run")) as f:
    assert "make pipeline-smoke" in f.read()
