"""The canary controller's registry side: the checks before anything moves, the alias moves
(registry_promote: audited transactions over MLflow, the model config file and the server), and
the canary's decisions appended to the registry audit log (`event: canary` lines, beside the
alias moves they cause)."""

from __future__ import annotations

from mlops import registry_audit, registry_promote, registry_serving
from mlops.canary import CanaryError, CanarySpec
from mlops.registry_store import alias_version


class RegistryRollout:
  """`canary.Rollout` on the MLflow registry. Construct with `preflight` first."""

  def __init__(self, mlflow_client, spec: CanarySpec, model_config_file: str, server: str | None):
    self.client, self.spec = mlflow_client, spec
    self.model_config_file, self.server = model_config_file, server
    self.export_base = registry_promote.export_base_of(mlflow_client, spec.name)

  def preflight(self) -> int:
    """Checks everything a canary needs before anything moves; returns the stable version.
    Raises RegistryError (unknown model or version, unservable) or CanaryError."""
    spec, client = self.spec, self.client
    registry_promote.check_servable(client, spec.name, spec.candidate)
    gate = registry_promote.gate_verdict(client, spec.name, spec.candidate)
    if gate["verdict"] != "pass":
      why = f"its gate failed: {', '.join(gate['failed'])}" if gate["failed"] else "no gate record"
      raise CanaryError(
        f"--candidate={spec.candidate} of {spec.name} has no passing gate record ({why}); run "
        f"python -m mlops.validate --name={spec.name} --candidate={spec.candidate} first"
      )
    text = registry_serving.read_text(self.model_config_file)
    if text is None:
      raise CanaryError(
        f"--model_config_file={self.model_config_file} does not exist; give the model config "
        "the server serves (the one `mlops.registry promote` writes)"
      )
    labels = registry_serving.labels(text, self.model_config_file, spec.name)
    stable = labels.get(spec.stable_label)
    if stable is None:
      raise CanaryError(
        f"--model_config_file={self.model_config_file} gives {spec.name} no label "
        f"{spec.stable_label!r} (labels: {sorted(labels) or 'none'}); promote a version to "
        f"{spec.stable_label} first, or name the stable label with --stable_label"
      )
    if stable == spec.candidate:
      raise CanaryError(
        f"--candidate={spec.candidate} is already {spec.name}@{spec.stable_label}; nothing to canary"
      )
    return stable

  def _where(self, reason: str) -> dict:
    return {"model_config_file": self.model_config_file, "server": self.server, "reason": reason}

  def point_canary(self, version: int) -> None:
    registry_promote.promote(
      self.client, self.spec.name, version, self.spec.canary_label, **self._where("canary start")
    )

  def promote(self, version: int) -> None:
    """Moves the stable label (production by default) to `version`, unless it is there."""
    if alias_version(self.client, self.spec.name, self.spec.stable_label) == version:
      return
    registry_promote.promote(
      self.client, self.spec.name, version, self.spec.stable_label, **self._where("canary passed")
    )

  def remove_canary(self) -> None:
    registry_promote.remove_alias(
      self.client, self.spec.name, self.spec.canary_label, **self._where("canary ended")
    )

  def audit(self, record: dict) -> None:
    registry_audit.append(self.export_base, record)
