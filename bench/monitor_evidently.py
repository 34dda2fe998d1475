r"""The Evidently side of bench/monitor_drift.py; runs in a throwaway venv, never the project's.

  /tmp/evid/bin/python bench/monitor_evidently.py DATA.npz OUT.json

(`python3 -m venv /tmp/evid && /tmp/evid/bin/pip install evidently "pandas<3"`.) For each case
in DATA.npz (`<regime>_<case>` arrays against `<regime>_reference`) runs Evidently's
DataDriftPreset with its defaults and writes per-feature verdicts, scores, methods and the
seconds of `Report.run` to OUT.json. Imports nothing from this project.
"""

import json
import re
import sys
import time

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

_METRIC = re.compile(
  r"ValueDrift\(column=(?P<column>[^,]+),method=(?P<method>[^,]+),threshold=(?P<threshold>[^)]+)\)"
)


def verdicts(reference: np.ndarray, current: np.ndarray, categorical: list[int]) -> dict:
  columns = [f"f{j}" for j in range(reference.shape[1])]
  kinds = DataDefinition(
    numerical_columns=[c for j, c in enumerate(columns) if j not in categorical],
    categorical_columns=[columns[j] for j in categorical],
  )
  ref = pd.DataFrame(reference, columns=columns)
  cur = pd.DataFrame(current, columns=columns)
  for j in categorical:
    ref[columns[j]] = ref[columns[j]].astype(int)
    cur[columns[j]] = cur[columns[j]].astype(int)
  start = time.perf_counter()
  snapshot = Report([DataDriftPreset()]).run(
    Dataset.from_pandas(cur, data_definition=kinds), Dataset.from_pandas(ref, data_definition=kinds)
  )
  result = snapshot.dict()
  seconds = time.perf_counter() - start
  by_column = {}
  for metric in result["metrics"]:
    match = _METRIC.match(metric["metric_name"])
    if not match:
      continue
    value, threshold = float(metric["value"]), float(match["threshold"])
    test = "p_value" in match["method"]
    by_column[match["column"]] = (
      value < threshold if test else value >= threshold,
      value,
      match["method"],
    )
  ordered = [by_column[c] for c in columns]
  return {
    "drifted": [bool(v[0]) for v in ordered],
    "scores": [v[1] for v in ordered],
    "methods": sorted({v[2] for v in ordered}),
    "seconds": seconds,
  }


def main(data_path: str, out_path: str) -> None:
  data = np.load(data_path)
  categorical = data["categorical"].tolist()
  out = {}
  for key in data.files:
    if key == "categorical" or key.endswith("_reference"):
      continue
    regime = key.split("_")[0]
    out[key] = verdicts(data[f"{regime}_reference"], data[key], categorical)
    print(f"evidently {key}: {sum(out[key]['drifted'])}/64 drifted in {out[key]['seconds']:.2f} s")
  with open(out_path, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
