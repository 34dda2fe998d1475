r"""Ground truth for logged predictions: labels by request id, joined onto the logs' rows.

  python -m mlops.feedback import FILE --logs=DIR   # CSV (request_id,label[,row]) or JSONL

Feedback reaches `DIR/feedback.jsonl` (next to the model's prediction log files; readers of the
logs skip it) from the server's `POST /v1/models/NAME/feedback` (serving/server/feedback.py) or
from `import`, which checks every entry of FILE before appending any (nothing half-imported).
Each entry is `request_id` (the request's x-request-id), `label` (an integer class) and `row`
(the example's index in its request, default 0); a later entry for the same (request id, row)
replaces an earlier one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

import numpy as np
from absl import flags

from mlops import cli_help
from mlops.prediction_log import LogError, Logs
from serving.server import feedback as server_feedback
from serving.server.log_format import FEEDBACK_FILE


@dataclasses.dataclass(frozen=True)
class Feedback:
  """Ground-truth labels joined onto log rows."""

  labels: np.ndarray  # int64 per log row; -1 where no feedback exists
  num_feedback: int  # rows in the feedback file
  unknown_ids: int  # feedback rows whose (request id, row) is not in the logs
  matched: int


def read_feedback(path: str) -> dict[tuple[str, int], int]:
  """(request id, row) -> label from a CSV (header `request_id,label[,row]`) or JSONL file.

  Raises LogError naming the file and the line for a missing or non-integer field.
  """
  if not os.path.isfile(path):
    raise LogError(f"--feedback={path} is not a file")
  with open(path, newline="") as f:
    if path.endswith((".jsonl", ".json")):
      entries = []
      for number, line in enumerate(f, start=1):
        if line.strip():
          try:
            entries.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise LogError(f"{path} line {number} is not JSON ({e})") from e
    else:
      entries = list(csv.DictReader(f))
  labels = {}
  for line, entry in enumerate(entries, start=1):
    try:
      key = (str(entry["request_id"]), int(entry.get("row") or 0))
      labels[key] = int(entry["label"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise LogError(
        f"--feedback={path} entry {line}: needs request_id and an integer label ({e!r})"
      ) from e
  return labels


def join_feedback(logs: Logs, labels: dict[tuple[str, int], int]) -> Feedback:
  """Labels per log row (-1 where none), and how many feedback entries matched no row."""
  index = {
    key: i
    for i, key in enumerate(
      zip(logs.request_id.tolist(), logs.row_in_request.tolist(), strict=True)
    )
  }
  joined = np.full(len(logs), -1, np.int64)
  unknown = 0
  for key, label in labels.items():
    row = index.get(key)
    if row is None:
      unknown += 1
    else:
      joined[row] = label
  return Feedback(joined, len(labels), unknown, len(labels) - unknown)


def import_file(path: str, logs_dir: str) -> tuple[int, str]:
  """Appends the entries of `path` (CSV or JSONL) to `logs_dir`/feedback.jsonl after checking
  them all; returns (entries, the feedback file). Raises LogError naming the file and entry."""
  if not os.path.isdir(logs_dir):
    raise LogError(f"--logs={logs_dir} is not a directory; give the prediction log directory")
  labels = read_feedback(path)
  if not labels:
    raise LogError(f"{path} holds no feedback entries (request_id,label[,row])")
  target = os.path.join(logs_dir, FEEDBACK_FILE)
  entries = [{"request_id": r, "label": label, "row": row} for (r, row), label in labels.items()]
  server_feedback.append(target, entries)
  return len(entries), target


def main(argv: list[str]) -> int:
  """Runs the CLI on `argv` (argv[0] is the program); returns the exit status."""
  fv = flags.FlagValues()
  flags.DEFINE_string("logs", None, "The prediction log directory to import into.", flag_values=fv)
  if cli_help.help_requested(argv[1:]):
    print(cli_help.help_text(__doc__, fv))
    return 0
  try:
    rest = fv(argv)
    if len(rest) != 3 or rest[1] != "import":
      raise LogError("usage: python -m mlops.feedback import FILE --logs=DIR")
    if not fv.logs:
      raise LogError("--logs=DIR (the prediction log directory) is required")
    count, target = import_file(rest[2], fv.logs)
  except (LogError, flags.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"imported {count} feedback entries into {target}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
