r"""A/B test report on prediction logs: is the split healthy, and does the treatment arm differ?

  python -m mlops.abtest --logs=/logs/digits [--feedback=labels.csv] [--metric=accuracy] \
      [--weights=stable=90,canary=10 | --traffic_config=FILE [--model=NAME]] [--control=stable] \
      [--mde=0.02] [--sequential] [--out=DIR]

Reads the logs (mlops/prediction_log.py's format; primary records with an `arm` only: shadow
copies and requests that named a version themselves are counted and left out) and writes
`abtest.md`, `abtest.json` and PNGs to --out (default LOGS/abtest):

* requests per arm (OK + error records) and the sample-ratio-mismatch check against --weights
  or the split in the server's --traffic_config (default: equal weights, said so in the
  report), flagged at p < 0.001;
* error rate per arm; with --feedback, --metric per arm on labelled rows, joined by request id,
  as treatment - control with a 95% CI and p-value (every arm against --control, default the
  first arm of --weights);
* latency p50/p99 per arm and a Mann-Whitney U test;
* sample-size planning: labelled rows per arm to detect --mde (alpha 0.05, power 0.8) and how
  many more requests that means at the current label coverage;
* --sequential: the always-valid mSPRT p-value and confidence sequence (mlops/abtest_stats.py),
  valid however often the report is rerun. The fixed-horizon p-value is valid only when read
  once, at a sample size planned beforehand.

Exit status 0 with the report written, 1 with one `error: ...` line on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
from absl import flags

from mlops import abtest_stats, cli_help, prediction_log
from mlops.abtest_stats import Difference, Latency, Sequential, Srm

METRICS = ("accuracy",)


class AbtestError(ValueError):
  """Bad flags or inputs; printed as one line."""


@dataclasses.dataclass(frozen=True)
class ArmComparison:
  """One treatment arm against the control."""

  arm: str
  errors: Difference  # error rate per request
  metric: Difference | None  # None without enough labelled rows
  latency: Latency
  plan: dict  # sample-size planning (see _plan)
  sequential: Sequential | None


@dataclasses.dataclass(frozen=True)
class AbtestResult:
  logs_dir: str
  metric: str
  control: str
  weights: dict[str, float]
  weights_assumed: bool
  srm: Srm
  arms: dict[str, dict]  # arm -> {requests, errors, rows, labelled, metric}
  comparisons: list[ArmComparison]
  read: dict
  latency_us: dict[str, np.ndarray]


def parse_weights(text: str) -> dict[str, float]:
  """`a=50,b=50` -> {"a": 50.0, "b": 50.0}. Raises AbtestError naming the bad item."""
  weights = {}
  for item in text.split(","):
    name, sep, value = item.strip().partition("=")
    try:
      weight = float(value)
    except ValueError:
      weight = -1.0
    if not sep or not name or weight < 0 or not np.isfinite(weight) or name in weights:
      raise AbtestError(
        f"--weights={text}: bad item {item!r}; give ARM=WEIGHT pairs with distinct arms and "
        "non-negative weights, e.g. stable=90,canary=10"
      )
    weights[name] = weight
  if len(weights) < 2 or sum(weights.values()) <= 0:
    raise AbtestError(f"--weights={text}: needs at least two arms and a positive total")
  return weights


def weights_from_traffic_config(path: str, model: str | None) -> dict[str, float]:
  """The split's weights of `model` (or of the file's only model) in the server's traffic
  config (`--traffic_config_file`, JSON: {"models": {NAME: {"split": {"arms": [{"label": L,
  "weight": W}, ...]}}}}). Raises AbtestError naming the file and what is missing."""
  try:
    with open(path) as f:
      models = json.load(f)["models"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise AbtestError(
      f"--traffic_config={path} is not a readable traffic config ({e}); give the server's "
      "--traffic_config_file or --weights"
    ) from e
  if model is None and len(models) == 1:
    model = next(iter(models))
  if model not in models:
    raise AbtestError(
      f"--traffic_config={path}: give --model= one of {sorted(models)} (model {model!r})"
    )
  try:
    arms = models[model]["split"]["arms"]
    text = ",".join(f"{arm['label']}={arm['weight']}" for arm in arms)
  except (KeyError, TypeError) as e:
    raise AbtestError(f"--traffic_config={path}: model {model} has no split arms ({e})") from e
  return parse_weights(text)


def _read(logs_dir: str, feedback: str | None, rpc: str):
  prediction_log.log_files(logs_dir)  # A missing directory fails before TensorFlow loads.
  logs = prediction_log.read_logs(logs_dir, rpc=rpc)
  if logs.num_records == 0:
    raise AbtestError(f"--logs={logs_dir} holds no complete record")
  primary = logs.select(logs.role == "primary")
  split = primary.select(primary.arm != "")
  errors = {a: n for a, n in logs.errors_by_arm.items() if a}
  if len(split) == 0 and not errors:
    raise AbtestError(
      f"--logs={logs_dir}: none of its {logs.num_records} records was assigned an arm by a "
      "traffic split (metadata `arm`); give the logs of a model with a split"
    )
  labels, info = None, None
  if feedback and len(split) and "classes" not in split.outputs:
    raise AbtestError(
      f"--feedback={feedback}: the logged outputs {sorted(split.outputs)} have no `classes` to "
      "compare with labels (accuracy needs a classification signature)"
    )
  if feedback:
    joined = prediction_log.join_feedback(split, prediction_log.read_feedback(feedback))
    labels = joined.labels
    info = {"path": feedback, "entries": joined.num_feedback, "matched": joined.matched}
    info["unknown_ids"] = joined.unknown_ids
  read = {
    "logs": logs_dir,
    "records": logs.num_records,
    "torn_records": logs.torn_records,
    "shadow_rows": int((logs.role == "shadow").sum()),
    "bypassed_rows": int(len(primary) - len(split)),
    "schema_breaks": logs.schema_breaks,
    "feedback": info,
  }
  return split, errors, labels, read


def _arm_summary(split, errors, labels, arm: str) -> dict:
  mask = split.arm == arm
  first_rows = mask & (split.row_in_request == 0)  # one per OK request
  ok = int(first_rows.sum())
  summary = {"requests": ok + errors.get(arm, 0), "errors": errors.get(arm, 0)}
  summary.update(rows=int(mask.sum()), labelled=0, correct=0, metric=float("nan"))
  if labels is not None and "classes" in split.outputs:
    labelled = mask & (labels >= 0)
    correct = np.asarray(split.outputs["classes"]).reshape(len(split), -1)[:, 0] == labels
    summary.update(labelled=int(labelled.sum()), correct=int((correct & labelled).sum()))
    if summary["labelled"]:
      summary["metric"] = summary["correct"] / summary["labelled"]
  summary["latency_us"] = split.latency_us[first_rows]
  return summary


def _plan(control: dict, treatment: dict, weights, arm, control_arm, mde: float) -> dict:
  """Labelled rows per arm needed for --mde, and the requests still to wait for."""
  if control["labelled"] == 0:
    return {"mde": mde, "note": "no labelled rows: give --feedback to plan the sample size"}
  ratio = weights[arm] / weights[control_arm] if weights[control_arm] else 1.0
  need_a, need_b = abtest_stats.sample_size(control["metric"], mde, max(ratio, 1e-6))
  more = {}
  for name, need, have in ((control_arm, need_a, control), (arm, need_b, treatment)):
    coverage = have["labelled"] / max(have["requests"], 1)
    share = weights[name] / sum(weights.values())
    missing = max(need - have["labelled"], 0)
    more[name] = int(np.ceil(missing / max(coverage * share, 1e-12))) if missing else 0
  need = {control_arm: need_a, arm: need_b}
  return {"mde": mde, "need": need, "more_requests": max(more.values())}


def analyze(
  logs_dir: str,
  *,
  feedback: str | None = None,
  metric: str = "accuracy",
  weights: dict[str, float] | None = None,
  control: str | None = None,
  mde: float = 0.02,
  sequential: bool = False,
  rpc: str = "Predict",
) -> AbtestResult:
  """Reads the logs of `rpc` (prediction_log.read_logs) and computes every number of the
  report. Raises AbtestError or prediction_log.LogError on bad input."""
  if metric not in METRICS:
    raise AbtestError(f"--metric={metric} is unknown; choose from {', '.join(METRICS)}")
  if not 0 < mde < 1:
    raise AbtestError(f"--mde={mde} must be an absolute change between 0 and 1, e.g. 0.02")
  split, errors, labels, read = _read(logs_dir, feedback, rpc)
  seen = sorted(set(split.arm.tolist()) | set(errors))
  assumed = weights is None
  weights = weights or {a: 1.0 for a in seen}
  if set(seen) - set(weights):
    raise AbtestError(
      f"--weights={','.join(f'{a}={w:g}' for a, w in weights.items())} lacks the logged arms "
      f"{sorted(set(seen) - set(weights))}; name every arm of the split"
    )
  control = control or next(iter(weights))
  if control not in weights:
    raise AbtestError(f"--control={control} is not an arm; choose from {sorted(weights)}")
  arms = {a: _arm_summary(split, errors, labels, a) for a in weights}
  srm = abtest_stats.srm_check({a: s["requests"] for a, s in arms.items()}, weights)
  comparisons = [
    _compare(split, labels, arms, weights, control, arm, mde, sequential)
    for arm in weights
    if arm != control
  ]
  latency = {a: s.pop("latency_us") for a, s in arms.items()}
  return AbtestResult(
    logs_dir, metric, control, weights, assumed, srm, arms, comparisons, read, latency
  )


def _compare(split, labels, arms, weights, control, arm, mde, sequential) -> ArmComparison:
  a, b = arms[control], arms[arm]
  errors = abtest_stats.proportion_difference(
    a["errors"], max(a["requests"], 1), b["errors"], max(b["requests"], 1)
  )
  metric = None
  if a["labelled"] and b["labelled"]:
    metric = abtest_stats.proportion_difference(
      a["correct"], a["labelled"], b["correct"], b["labelled"]
    )
  latency = abtest_stats.latency_comparison(a["latency_us"], b["latency_us"], (control, arm))
  path = None
  if sequential and metric is not None:
    rows = np.flatnonzero(np.isin(split.arm, (control, arm)) & (labels >= 0))
    rows = rows[np.argsort(split.time_us[rows], kind="stable")]
    correct = np.asarray(split.outputs["classes"]).reshape(len(split), -1)[rows, 0] == labels[rows]
    path = abtest_stats.always_valid(correct, split.arm[rows] == arm, tau=mde)
  plan = _plan(a, b, weights, arm, control, mde)
  return ArmComparison(arm, errors, metric, latency, plan, path)


def _flag_values() -> flags.FlagValues:
  """The CLI's flags on their own FlagValues (the module is imported by tests and other CLIs)."""
  fv = flags.FlagValues()
  flags.DEFINE_string("logs", None, "Directory of prediction log files.", flag_values=fv)
  flags.DEFINE_string("feedback", None, "CSV/JSONL of request_id,label[,row].", flag_values=fv)
  flags.DEFINE_string("metric", "accuracy", f"One of {METRICS}.", flag_values=fv)
  flags.DEFINE_string("weights", None, "Configured split, e.g. a=50,b=50.", flag_values=fv)
  flags.DEFINE_string(
    "traffic_config", None, "Take the weights from the server's traffic config.", flag_values=fv
  )
  flags.DEFINE_string("model", None, "Model in --traffic_config (if several).", flag_values=fv)
  flags.DEFINE_string("control", None, "Control arm (default: first of --weights).", flag_values=fv)
  flags.DEFINE_float("mde", 0.02, "Minimum detectable (absolute) effect.", flag_values=fv)
  flags.DEFINE_bool("sequential", False, "Add the always-valid mSPRT.", flag_values=fv)
  flags.DEFINE_enum(
    "rpc", "Predict", list(prediction_log.RPCS), "Compare the records of this RPC.", flag_values=fv
  )
  flags.DEFINE_string("out", None, "Report directory; default LOGS/abtest.", flag_values=fv)
  return fv


def main(argv: list[str]) -> int:
  """Runs the CLI on `argv` (argv[0] is the program); returns the exit status."""
  from mlops import abtest_report

  fv = _flag_values()
  if cli_help.help_requested(argv[1:]):
    print(cli_help.help_text(__doc__, fv))
    return 0
  try:
    rest = fv(argv)
    if len(rest) > 1:
      raise AbtestError(f"unexpected arguments: {rest[1:]}")
    if not fv.logs:
      raise AbtestError("--logs=DIR (the prediction log directory) is required")
    if fv.weights and fv.traffic_config:
      raise AbtestError("give --weights or --traffic_config, not both")
    weights = parse_weights(fv.weights) if fv.weights else None
    if fv.traffic_config:
      weights = weights_from_traffic_config(fv.traffic_config, fv.model)
    result = analyze(
      fv.logs,
      feedback=fv.feedback,
      metric=fv.metric,
      weights=weights,
      control=fv.control,
      mde=fv.mde,
      sequential=fv.sequential,
      rpc=fv.rpc,
    )
    report = abtest_report.write(result, fv.out or os.path.join(fv.logs, "abtest"))
  except (AbtestError, prediction_log.LogError, flags.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(abtest_report.summary(result))
  print(f"report: {report}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
