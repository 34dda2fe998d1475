"""The canary report: `canary.md` (a table per interval: weight, every check's measured value,
threshold and verdict, the decision) and `canary.json` (the same record), rewritten atomically
after every decision so it can be read while the canary runs. Generated from the controller's
`Outcome`, never by hand."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile

from mlops.canary import Outcome


def _when(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def _value(check: dict) -> str:
  return "" if check["measured"] is None else f"{check['measured']:.4g}"


def markdown(outcome: Outcome) -> str:
  spec = outcome.spec
  t = spec.thresholds
  lines = [
    f"# Canary: {spec.name} version {spec.candidate}",
    "",
    f"- result: **{outcome.result.replace('_', ' ').upper()}**"
    + (f" ({outcome.reason})" if outcome.reason else ""),
    f"- run {outcome.run_id}, started {_when(outcome.started)}, ended {_when(outcome.ended)}",
    f"- arms: `{spec.stable_label}` (stable) vs `{spec.canary_label}` (candidate), split key "
    f"`{spec.split_key}`",
    f"- step {spec.step_weight}% every {spec.interval_s:g} s up to {spec.max_weight}%; roll back "
    f"at {spec.threshold} failed checks; at least {t.min_requests} requests per arm per interval",
    f"- weights written to the traffic config, in order: {outcome.weights}",
    "",
    "| interval | window (UTC) | weight | check | measured | threshold | verdict | detail |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for interval in outcome.intervals:
    window = f"{_when(interval.start)} - {_when(interval.end)}"
    for i, check in enumerate(interval.checks):
      head = (interval.number, window, f"{interval.weight}%") if i == 0 else ("", "", "")
      lines.append(
        f"| {head[0]} | {head[1]} | {head[2]} | {check['name']} | {_value(check)} | "
        f"{check['threshold']} | {check['verdict']} | {check['detail']} |"
      )
    lines.append(
      f"| | | | **decision** | | | **{interval.action}** | failed checks "
      f"{interval.failed_checks}/{spec.threshold}; next weight {interval.next_weight}% |"
    )
  return "\n".join(lines) + "\n"


def record(outcome: Outcome) -> dict:
  return dataclasses.asdict(outcome)


def write(outcome: Outcome, out: str) -> str:
  """Writes `canary.md` and `canary.json` into `out` (each by temp file + rename); returns the
  markdown's path."""
  os.makedirs(out, exist_ok=True)
  texts = {
    "canary.json": json.dumps(record(outcome), indent=1, default=float) + "\n",
    "canary.md": markdown(outcome),
  }
  for name, text in texts.items():
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=out)
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))
  return os.path.join(out, "canary.md")
