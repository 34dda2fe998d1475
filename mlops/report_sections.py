"""The Markdown sections of the experiment report, each computed from a run's records."""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections
import numpy as np

from mlops.report_format import table as _table
from mlops.report_records import ModelFacts, RunRecords
from trainer import tracking
from trainer.metrics import flatten_config

# Hyperparameters shown in the configuration table (the full config is in manifest.json).
_KEY_HYPERPARAMETERS = (
  "optim.name",
  "optim.learning_rate",
  "optim.schedule",
  "optim.warmup_steps",
  "optim.weight_decay",
  "optim.grad_clip_norm",
  "optim.ema_decay",
  "model.dropout_rate",
  "model.dtype",
  "train.num_steps",
  "train.global_batch_size",
  "seed",
)
# A train/eval loss gap above this fraction of the eval loss is called out.
_GAP_WARNING = 0.2


def objective(config: dict) -> str:
  text = (config.get("description") or "").strip()
  if not text:
    text = "_No objective recorded: this run's `config.description` is empty. Set it (e.g. "
    text += "`--config.description='...'`) to say what the run is for._"
  return f"## Objective\n\n{text}"


def configuration(records: RunRecords, facts: ModelFacts | None) -> str:
  config, manifest = records.config, records.manifest
  flat = flatten_config_dict(config)
  devices = manifest.get("devices", {})
  data = config.get("data", {})
  size = f"{facts.train_examples} train / {facts.eval_examples} eval examples" if facts else "n/a"
  rows = [
    ("model", config.get("model", {}).get("name")),
    ("parameters", f"{facts.parameter_count:,}" if facts else "n/a (no checkpoint)"),
    ("dataset", data.get("name")),
    ("dataset size", size),
    ("data fingerprint", f"`{manifest.get('data_fingerprint')}`"),
    ("mesh", ", ".join(f"{k}={v}" for k, v in manifest.get("mesh", {}).items())),
    ("devices", f"{devices.get('count')} x {devices.get('kind')} ({devices.get('platform')})"),
    ("processes", devices.get("process_count")),
    ("git commit", _git(manifest)),
  ]
  rows += [(f"`{k}`", flat[k]) for k in _KEY_HYPERPARAMETERS if k in flat]
  return "## Configuration\n\n" + _table(("", "value"), rows)


def _git(manifest: dict) -> str:
  git = manifest.get("git") or {}
  commit = (git.get("commit") or "unknown")[:12]
  return f"{commit} (uncommitted changes)" if git.get("dirty") else commit


def flatten_config_dict(config: dict) -> dict:
  """`{"optim.learning_rate": 0.003, ...}` from the manifest's JSON config."""
  return flatten_config(ml_collections.ConfigDict(config))


def _best(records: RunRecords) -> tuple[int, float] | None:
  """(step, value) of the best eval of the best metric, by the run's best_mode."""
  eval_config = records.config["eval"]
  series = records.series(f"eval/{eval_config['best_metric']}")
  if series is None or not len(series[0]):
    return None
  index = int(np.argmax(series[1]) if eval_config["best_mode"] == "max" else np.argmin(series[1]))
  return int(series[0][index]), float(series[1][index])


def _eval_at(records: RunRecords, tag: str, step: int) -> float:
  series = records.series(tag)
  if series is None:
    return math.nan
  hits = np.nonzero(series[0] == step)[0]
  return float(series[1][hits[-1]]) if len(hits) else math.nan


def results(records: RunRecords, images: Sequence[str], per_class) -> str:
  eval_tags = sorted(t for t in records.scalars if t.startswith("eval/"))
  best = _best(records)
  lines = ["## Results"]
  if not eval_tags:
    lines.append("_No eval was recorded._")
  else:
    final_step = int(records.series(eval_tags[0])[0][-1])
    header = ["metric", f"final (step {final_step})"]
    header.append(f"at best step ({best[0]})" if best else "best")
    rows = [
      (t, records.last(t), _eval_at(records, t, best[0]) if best else math.nan) for t in eval_tags
    ]
    if records.is_language_model and "eval/perplexity" not in eval_tags:
      rows += [
        ("eval/perplexity", math.exp(r[1]), math.exp(r[2])) for r in rows if r[0] == "eval/loss"
      ]
    lines.append(_table(header, rows))
    lines.append(_test_metrics(records))
  lines += [f"![{name}]({name})" for name in images]
  if per_class:
    rows = [(c, n, acc) for c, n, acc in per_class]
    lines.append(
      "Per-class accuracy (eval split):\n\n" + _table(("class", "examples", "accuracy"), rows)
    )
  if records.is_language_model:
    tokens = records.series("perf/tokens_per_sec")
    if tokens is not None and len(tokens[1]):
      lines.append(f"Training throughput: median {np.median(tokens[1]):,.0f} tokens/s.")
  return "\n\n".join(lines)


def _test_metrics(records: RunRecords) -> str:
  """The held-out metrics saved with the checkpoints (the eval split is the test split)."""
  if not records.checkpoint_metrics:
    return "_No checkpoint carries eval metrics (config.checkpoint.keep_best=0)._"
  step = max(records.checkpoint_metrics)
  best = _best(records)
  if best and best[0] in records.checkpoint_metrics:
    step = best[0]
  metrics = records.checkpoint_metrics[step]
  rows = [(k, float(v)) for k, v in sorted(metrics.items())]
  return f"Test metrics of the kept checkpoint at step {step} (held-out split):\n\n" + _table(
    ("metric", "value"), rows
  )


def artifacts(records: RunRecords) -> str:
  workdir = records.workdir
  steps = ", ".join(str(s) for s in records.checkpoint_steps) or "none"
  lines = [
    "## Artifacts",
    f"- Checkpoints: `{workdir}/checkpoints` (steps {steps})",
    f"- TensorBoard: `tensorboard --logdir {workdir}/tensorboard`",
    f"- Manifest (full config, versions, git): `{workdir}/manifest.json`",
  ]
  run = records.mlflow_run
  if run:
    uri = run["tracking_uri"]
    ui = "mlflow ui  # from the project root" if uri == tracking.DEFAULT_TRACKING_URI else None
    ui = ui or f"mlflow ui --backend-store-uri '{uri}'"
    lines += [
      f"- MLflow run `{run['run_id']}` (experiment {run['experiment_id']}) in `{uri}`",
      f"- MLflow UI: `{ui}`",
    ]
  else:
    lines.append("- MLflow: this run was not tracked (no mlflow_run.json)")
  return "\n".join(lines)


def observations(records: RunRecords) -> str:
  config = records.config
  lines = ["## Observations", "_Computed from the run's records._", ""]
  best = _best(records)
  metric = f"eval/{config['eval']['best_metric']}"
  last_step = int(records.series(metric)[0][-1]) if best else None
  if best:
    if best[0] == last_step:
      lines.append(f"- The best {metric} ({best[1]:.4g}) came at the last eval (step {last_step}).")
    else:
      lines.append(
        f"- The best {metric} ({best[1]:.4g}) came at step {best[0]}, before the last eval "
        f"(step {last_step}: {records.last(metric):.4g}); later steps did not help."
      )
  train_loss, eval_loss = records.last("train/loss"), records.last("eval/loss")
  if train_loss is not None and eval_loss is not None:
    gap = eval_loss - train_loss
    note = " (large: overfitting?)" if eval_loss and gap > _GAP_WARNING * abs(eval_loss) else ""
    lines.append(
      f"- Train/eval gap: final train loss {train_loss:.4g}, eval loss {eval_loss:.4g}, gap {gap:+.4g}{note}."
    )
  lines.append(_ending(records))
  rate = records.series("perf/steps_per_sec")
  if rate is not None and len(rate[1]):
    examples = records.series("perf/examples_per_sec")
    extra = f", {np.median(examples[1]):,.0f} examples/s" if examples is not None else ""
    lines.append(f"- Throughput: median {np.median(rate[1]):,.1f} steps/s{extra}.")
  return "\n".join(lines)


def _ending(records: RunRecords) -> str:
  outcome = tracking.read_outcome(records.workdir) or {}
  reason = outcome.get("reason", "unknown")
  num_steps = records.config["train"]["num_steps"]
  last = records.series("train/loss")
  step = int(last[0][-1]) if last is not None and len(last[0]) else 0
  if reason == "completed":
    return f"- The run completed all {num_steps} steps."
  if reason == "stopped_early":
    return f"- Early stopping ended the run at step {step} of {num_steps}."
  if reason == "stopped_by_callback":
    return f"- A callback (e.g. the HPO pruner) stopped the run at step {step} of {num_steps}."
  if reason == "preempted":
    return f"- The run was preempted at step {step} of {num_steps}; rerun to resume."
  if reason.startswith("NonFiniteError"):
    return f"- The run stopped on a non-finite value: {reason.removeprefix('NonFiniteError: ')}"
  return f"- The run ended at step {step} of {num_steps} ({reason})."


def comparison(runs: Sequence[RunRecords], names: Sequence[str], image: str) -> str:
  flats = [flatten_config_dict(r.config) for r in runs]
  keys = sorted({k for f in flats for k in f if len({str(g.get(k)) for g in flats}) > 1})
  config_rows = [(f"`{k}`", *(f.get(k, "-") for f in flats)) for k in keys]
  metric = f"eval/{runs[0].config['eval']['best_metric']}"
  base_best = _best(runs[0])
  metric_rows = []
  for name, records in zip(names, runs, strict=True):
    best = _best(records)
    delta = best[1] - base_best[1] if best and base_best else math.nan
    final = records.last(metric)
    metric_rows.append(
      (name, final if final is not None else math.nan, best[1] if best else math.nan, delta)
    )
  lines = [
    "## Comparison",
    f"Runs: {', '.join(f'`{n}`' for n in names)} (deltas against `{names[0]}`).",
    "Config differences:\n\n" + (_table(("field", *names), config_rows) if keys else "_none_"),
    f"{metric}:\n\n" + _table(("run", "final", "best", "best delta"), metric_rows),
    f"![{image}]({image})",
  ]
  return "\n\n".join(lines)
