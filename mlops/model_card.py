"""Model cards: `MODEL_CARD.md` in a version's `assets.extra/` (and an artifact of its training
run), written at `register` and rewritten at `validate` (test-set evaluation, gate verdict) and
`promote` (aliases). Hugging Face style YAML front matter carries the evaluation results for
tools; the sections follow the model cards teams publish (details, intended use, data,
evaluation, limitations, lineage)."""

from __future__ import annotations

import json
import os

import yaml

from mlops import gate_record
from serving import contract

CARD = os.path.join(contract.ASSETS_EXTRA_DIR, "MODEL_CARD.md")
CONFUSION_PNG = os.path.join(contract.ASSETS_EXTRA_DIR, "confusion_matrix.png")
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
NOT_PROVIDED = "_not provided_ (set `config.card.{}` in the training config)"


def manifest_of(version_dir: str) -> dict:
  return _read_json(os.path.join(version_dir, "assets.extra", "manifest.json")) or {}


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def parameter_count(version_dir: str, manifest: dict | None = None) -> int:
  """Values in the SavedModel's variables (the served weights): the count the export manifest
  recorded, else (exports that predate it) read from the variables with TensorFlow, whose import
  would otherwise be most of a promote command's time (the card is rewritten at every move)."""
  if manifest and manifest.get("parameter_count") is not None:
    return int(manifest["parameter_count"])
  import numpy as np

  from serving import native_logs

  with native_logs.filtered_stderr():  # The registry command did not start TensorFlow itself.
    import tensorflow as tf

  prefix = os.path.join(version_dir, "variables", "variables")
  return int(
    sum(
      np.prod(shape)
      for name, shape in tf.train.list_variables(prefix)
      if name != _OBJECT_GRAPH  # Checkpoint metadata, not a variable (it counted as 1).
    )
  )


def write(mlflow_client, name: str, version: int, version_dir: str, *, manifest=None) -> str:
  """(Re)writes the card of `name` version `version` from its manifest, gate record and
  aliases; returns its path."""
  manifest = manifest or manifest_of(version_dir)
  record = _read_json(os.path.join(version_dir, gate_record.RECORD_JSON))
  found = mlflow_client.get_model_version(name, str(version))
  if record and record.get("classifier"):
    confusion_png(
      record["classifier"]["confusion_matrix"],
      os.path.join(version_dir, CONFUSION_PNG),
      f"{name} v{version}, {record['data']['split']} split",
    )
  text = render(name, version, version_dir, manifest, record, found)
  path = os.path.join(version_dir, CARD)
  gate_record.write_file(path, text)
  files = [path] + (
    [os.path.join(version_dir, CONFUSION_PNG)] if record and record.get("classifier") else []
  )
  gate_record.log_to_run(
    mlflow_client, found.tags.get("mlflow.run_id"), files, f"registry/{name}/{version}"
  )
  return path


def front_matter(name, version, manifest, record) -> dict:
  kind = manifest.get("data_spec", {}).get("kind", "classification")
  data_name = manifest.get("config", {}).get("data", {}).get("name", "unknown")
  meta = {
    "model_name": name,
    "version": int(version),
    "library_name": "jax",
    "tags": [
      "jax",
      "flax",
      "tensorflow-serving",
      "text-generation" if kind == "language_model" else "image-classification",
    ],
    "datasets": [data_name],
  }
  if record:
    meta["model-index"] = [
      {
        "name": f"{name}/{version}",
        "results": [
          {
            "task": {
              "type": "text-generation" if kind == "language_model" else "image-classification"
            },
            "dataset": {
              "name": data_name,
              "type": data_name,
              "split": record["data"]["split"],
              "revision": record["data"]["fingerprint"],
            },
            "metrics": [
              {"type": k, "value": round(float(v), 6)} for k, v in record["metrics"].items()
            ]
            + (
              [
                {
                  "type": "expected_calibration_error",
                  "value": round(record["classifier"]["ece"], 6),
                }
              ]
              if record.get("classifier")
              else []
            ),
          }
        ],
      }
    ]
  return meta


def render(name, version, version_dir, manifest, record, found) -> str:
  config = manifest.get("config", {})
  card = config.get("card", {})
  export = manifest.get("export", {})
  packages = manifest.get("training_packages") or {}
  spec = manifest.get("data_spec", {})
  lines = [
    "---",
    yaml.safe_dump(front_matter(name, version, manifest, record), sort_keys=False).strip(),
    "---",
    "",
  ]
  lines += [f"# Model card: {name} version {version}", "", "## Model details", ""]
  lines += [
    f"- architecture: `{config.get('model', {}).get('name')}` (configs: {config.get('model', {})})",
    f"- parameters: {parameter_count(version_dir, manifest):,}",
    f"- version: {version} (registry version = TF Serving directory `{version_dir}`)",
    f"- registered: {_ms_to_iso(found.creation_timestamp)}; checkpoint step "
    f"{manifest.get('checkpoint_step')}",
    "- frameworks: "
    + ", ".join(f"{k} {v}" for k, v in sorted(packages.items()) if v)
    + f"; exported with TensorFlow {export.get('tensorflow')}, orbax-export "
    f"{export.get('orbax-export')}",
    f"- aliases now: {', '.join(found.aliases) or 'none'}",
    "",
  ]
  for title, key in (
    ("Intended use", "intended_use"),
    ("Out-of-scope use", "out_of_scope_use"),
    ("Ethical considerations", "ethical_considerations"),
  ):
    lines += [f"## {title}", "", card.get(key) or NOT_PROVIDED.format(key), ""]
  lines += [
    "## Training data",
    "",
    f"- dataset: `{config.get('data', {}).get('name')}`, fingerprint `{manifest.get('data_fingerprint')}`",
    f"- size: {record['data'].get('train_size')} training examples, {record['data']['size']} "
    f"in the {record['data']['split']} split"
    if record
    else "- size: known once `python -m mlops.validate` has run",
    f"- preprocessing in the graph: (x - {spec.get('mean')}) / {spec.get('std')}, served input "
    f"shape {spec.get('serving_input_shape')} reshaped to {spec.get('input_shape')}"
    if spec.get("kind") != "language_model"
    else "- preprocessing in the graph: none (byte tokens)",
    "",
  ]
  lines += _evaluation(record, spec.get("kind"))
  lines += _limitations(record, export)
  lines += [
    "## Lineage and gate",
    "",
    f"- training run: MLflow run `{found.tags.get('mlflow.run_id', 'not tracked')}`, workdir "
    f"`{manifest.get('workdir')}`",
    f"- code: git {manifest.get('git', {}).get('commit')} (dirty: {manifest.get('git', {}).get('dirty')})",
    f"- gate: {_gate_line(record)}",
    f"- full chain: `python -m mlops.registry lineage {name}/{version}`",
    "",
  ]
  return "\n".join(lines)


def _gate_line(record) -> str:
  if not record:
    return "not validated yet"
  against = (
    f"version {record['baseline']}" if record["baseline"] else "no baseline (absolute checks only)"
  )
  failed = f" (failed: {', '.join(record['failed'])})" if record["failed"] else ""
  return f"{record['verdict'].upper()} against {against}{failed}"


def _evaluation(record, kind) -> list[str]:
  lines = ["## Evaluation", ""]
  if not record:
    return [*lines, "Not evaluated on the test split yet: run `python -m mlops.validate`.", ""]
  split, size = record["data"]["split"], record["data"]["size"]
  selection = (
    "never used for checkpoint selection"
    if split == "test"
    else "this data has no separate test split, so this split also chose the checkpoint"
  )
  lines += [
    f"On the {split} split ({size} examples; {selection}).",
    "",
    "| metric | test set | production |",
    "| --- | --- | --- |",
  ]
  for metric, value in record["metrics"].items():
    lines.append(f"| {metric} | {value:.4f} | no labelled traffic yet |")
  if record.get("classifier"):
    summary = record["classifier"]
    lines.append(f"| expected calibration error | {summary['ece']:.4f} | no labelled traffic yet |")
    lines += ["", "Per-class accuracy:", "", "| class | accuracy |", "| --- | --- |"]
    lines += [f"| {c} | {a:.3f} |" for c, a in summary["per_class_accuracy"].items()]
    lines += ["", "![confusion matrix](confusion_matrix.png)"]
  elif kind == "language_model":
    lines += [
      "",
      f"Perplexity {record['metrics'].get('perplexity', float('nan')):.3f} "
      "(exp of the mean per-sequence token cross-entropy).",
    ]
  return [*lines, ""]


def _limitations(record, export) -> list[str]:
  lines = ["## Limitations", ""]
  if record and record.get("classifier"):
    worst = sorted(record["classifier"]["per_class_accuracy"].items(), key=lambda kv: kv[1])[:3]
    lines.append("- worst classes: " + ", ".join(f"{c} ({a:.3f})" for c, a in worst))
  lines += [
    f"- export: XlaCallModule calling convention {export.get('calling_convention_version')} "
    f"for platforms {export.get('platforms')}; older TF Serving releases cannot run it "
    "(`python -m serving.export --check_tf_serving=RELEASE`)",
    "",
  ]
  return lines


def _ms_to_iso(ms) -> str:
  import datetime

  return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="seconds")


def confusion_png(matrix: list[list[int]], path: str, title: str) -> None:
  """A labelled confusion-matrix heat map with the count in every cell."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  counts = np.asarray(matrix)
  fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
  image = ax.imshow(counts, cmap="Blues")
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(f"Confusion matrix: {title}", fontsize=10)
  ax.set_xticks(range(len(counts)))
  ax.set_yticks(range(len(counts)))
  for (i, j), value in np.ndenumerate(counts):
    ax.text(
      j,
      i,
      str(value),
      ha="center",
      va="center",
      fontsize=7,
      color="white" if value > counts.max() / 2 else "black",
    )
  fig.colorbar(image, ax=ax, fraction=0.046, label="examples")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
