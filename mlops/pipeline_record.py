"""A pipeline run as an MLflow run: its trigger, each step's outcome, links to what it made.

The MLflow calls of `python -m mlops.pipeline` live here. Each pipeline run is one MLflow run in
the experiment `pipeline/<model name>` with tags `pipeline.trigger` (manual, watch, ci),
`pipeline.step.<step>` = ok | failed | skipped | rejected, `pipeline.version` (the registry
version it registered), `pipeline.training_run_id` (the training run's MLflow run) and
`pipeline.outcome` (promoted | rejected | failed); the registered version gets the tag
`pipeline.run_id` back. The same facts are written first as `pipeline.json` beside the run's
workdir (the record), then logged as the run's artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from mlops import pipeline_guards
from mlops.registry_store import translate_errors

EXPERIMENT_PREFIX = "pipeline/"


@dataclasses.dataclass
class PipelineRecorder:
  """Collects one pipeline run's record and mirrors it into MLflow as it goes. Built by
  `start`; `step` after each step; `finish` once. Raises RegistryError when the store fails."""

  client: object
  run_id: str
  path: str
  record: dict

  @classmethod
  def start(cls, client, name: str, trigger: dict, params: dict, path: str) -> PipelineRecorder:
    experiment_name = EXPERIMENT_PREFIX + name
    with translate_errors(f"the pipeline experiment {experiment_name!r}"):
      experiment = client.get_experiment_by_name(experiment_name)
      experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(experiment_name)
      )
      run = client.create_run(
        experiment_id,
        run_name=os.path.basename(os.path.dirname(path)),
        tags={"pipeline.trigger": trigger.get("kind", "manual"), "pipeline.name": name},
      )
      for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:500])
      client.log_text(run.info.run_id, json.dumps(trigger, indent=1), "trigger.json")
    record = {
      "name": name,
      "mlflow_run_id": run.info.run_id,
      "trigger": trigger,
      "params": params,
      "started": time.time(),
      "steps": [],
      "outcome": "running",
    }
    recorder = cls(client, run.info.run_id, path, record)
    pipeline_guards.write_json_atomic(path, record)
    return recorder

  def step(self, step: str, outcome: str, seconds: float, **details) -> None:
    """Records that `step` ended with `outcome`; `details` (version numbers, paths, the
    failed checks) go into the record and, as `pipeline.<key>` tags, into the run."""
    self.record["steps"].append({"step": step, "outcome": outcome, "seconds": seconds, **details})
    pipeline_guards.write_json_atomic(self.path, self.record)
    with translate_errors("recording the pipeline step"):
      self.client.set_tag(self.run_id, f"pipeline.step.{step}", outcome)
      self.client.log_metric(self.run_id, f"seconds/{step}", seconds)
      for key, value in details.items():
        if value is not None and not isinstance(value, list | dict):
          self.client.set_tag(self.run_id, f"pipeline.{key}", str(value))

  def link_version(self, name: str, version: int) -> None:
    """Tags the registry version with this run: the version knows the pipeline that made it."""
    with translate_errors(f"tagging {name} version {version}"):
      self.client.set_model_version_tag(name, str(version), "pipeline.run_id", self.run_id)

  def finish(self, outcome: str, message: str) -> None:
    """Ends the run: FINISHED for promoted/rejected (the pipeline did its job; a rejection is
    a verdict), FAILED for failed. Logs the record as the run's artifact `pipeline.json`."""
    self.record.update(outcome=outcome, message=message, ended=time.time())
    pipeline_guards.write_json_atomic(self.path, self.record)
    with translate_errors("ending the pipeline run"):
      self.client.set_tag(self.run_id, "pipeline.outcome", outcome)
      self.client.log_artifact(self.run_id, self.path)
      status = "FAILED" if outcome == "failed" else "FINISHED"
      self.client.set_terminated(self.run_id, status)
