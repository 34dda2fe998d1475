"""The experiment report (python -m mlops.report): sections, tables and PNGs from a run's records."""

import subprocess
import sys

import pytest

from configs import lm
from mlops import report, report_records
from trainer import train

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> bool:
  data = path.read_bytes()
  return data.startswith(_PNG_MAGIC) and len(data) > 5000  # Not an empty canvas.


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """Two digits smoke runs that differ in learning rate."""
  import jax

  from tests.helpers.configs import smoke_config

  root = tmp_path_factory.mktemp("report")
  for name, lr in (("base", 3e-3), ("fast", 1e-2)):
    config = smoke_config({"optim.learning_rate": lr, "description": f"lr {lr}"})
    train.train_and_evaluate(config, str(root / name), devices=jax.devices()[:1])
  return root / "base", root / "fast"


def test_cli_writes_sections_tables_and_pngs_with_a_comparison(two_runs):
  base, fast = two_runs
  out = subprocess.run(
    [sys.executable, "-m", "mlops.report", f"--workdir={base}", f"--compare={fast}"],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == str(base / "report" / "report.md")
  text = (base / "report" / "report.md").read_text()
  for heading in (
    "## Objective",
    "## Configuration",
    "## Results",
    "## Artifacts",
    "## Observations",
    "## Comparison",
    "## Conclusions",
    "## Next steps",
  ):
    assert heading in text
  assert "lr 0.003" in text  # The objective is config.description.
  assert "| parameters | " in text and "| dataset size | 1257 train / 270 eval examples |" in text
  records = report_records.read_run(str(base))
  final_accuracy = records.last("eval/accuracy")
  assert f"| eval/accuracy | {final_accuracy:.4g} |" in text
  assert "- The run completed all 20 steps." in text
  assert f"tensorboard --logdir {base}/tensorboard" in text
  assert "mlflow ui --backend-store-uri" in text and records.mlflow_run["run_id"] in text
  # The comparison names the one differing hyperparameter, with both values.
  assert "| `optim.learning_rate` | 0.003 | 0.01 |" in text
  for png in ("curves.png", "confusion_matrix.png", "per_class_accuracy.png", "compare_curves.png"):
    assert f"]({png})" in text
    assert _png_ok(base / "report" / png), png
  # Per-class accuracy rows sum to the eval split.
  rows = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 4]
  per_class = [r.split("|") for r in rows if r.split("|")[1].strip().isdigit()]
  assert sum(int(r[2]) for r in per_class) == 270  # The validation split.


def test_cli_rejects_a_directory_without_a_run(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "mlops.report", f"--workdir={tmp_path}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "manifest.json" in out.stderr and "Traceback" not in out.stderr


def test_language_model_report_has_perplexity_and_throughput(tmp_path, one_device):
  config = lm.get_config("size=tiny,smoke")
  config.train.num_steps = 10
  config.eval.every_steps = 5
  config.data.worker_threads = 0
  # The bundled text has 13 documents: hold out every 4th so the test split is not empty.
  config.data.eval_every_documents = 4
  config.tracking.enabled = False
  train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  path = report.write_report(str(tmp_path))
  text = (tmp_path / "report" / "report.md").read_text()
  assert path == str(tmp_path / "report")
  assert "| eval/perplexity |" in text and "tokens/s" in text
  assert "this run was not tracked" in text
  assert _png_ok(tmp_path / "report" / "perplexity_throughput.png")
  assert not (tmp_path / "report" / "confusion_matrix.png").exists()
