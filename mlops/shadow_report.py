r"""Shadow deployment report: how the mirrored (shadow) model's answers differ from the primary's.

  python -m mlops.shadow_report --logs=/logs/digits [--out=DIR] [--top=10]

A mirrored request is logged twice under one request id, role `primary` and role `shadow`
(mlops/prediction_log.py). This pairs the two by (request id, row) and writes `shadow.md`,
`shadow.json` and `shadow.png` to --out (default LOGS/shadow):

* class agreement rate (the `classes` output, first column when there are several);
* per-row output differences of every floating-point output (max |primary - shadow| over the row's
  elements): max, mean, p50/p99, and their distribution;
* latency per request: shadow - primary, p50/p99 (the shadow runs beside or after the primary, so
  this is its cost, not what users waited);
* shadow error rate (error records of role shadow over all shadow records) and what could not be
  paired (a primary not mirrored, a shadow whose primary errored or was not logged);
* the `--top` most different rows (disagreeing classes first, then by output difference).

Exit status 0 with the report written, 1 with one `error: ...` line on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from absl import flags
from matplotlib.figure import Figure

from mlops import cli_help, prediction_log, report_format


class ShadowError(ValueError):
  """Bad flags or inputs; printed as one line."""


@dataclasses.dataclass(frozen=True)
class OutputDiff:
  name: str
  max: float
  mean: float
  p50: float
  p99: float
  per_row: np.ndarray  # max |primary - shadow| per paired row


@dataclasses.dataclass(frozen=True)
class ShadowResult:
  logs_dir: str
  pairs: int  # paired rows
  paired_requests: int
  agreement: float | None  # class agreement rate; None without a `classes` output
  confusion: np.ndarray | None  # primary class (rows) x shadow class (columns) counts
  diffs: list[OutputDiff]
  latency_delta_ms: dict[str, float]  # p50/p99 of shadow - primary per request
  latency_ms: dict[str, np.ndarray]  # "primary"/"shadow" -> per paired request
  shadow_records: int
  shadow_errors: int
  unpaired: dict[str, int]
  versions: dict[str, list[str]]
  top: list[dict]


def _pair(logs) -> tuple[np.ndarray, np.ndarray]:
  """Indices (primary rows, shadow rows) of the rows logged under the same (request id, row)."""
  keys = np.char.add(np.char.add(logs.request_id, "\x00"), logs.row_in_request.astype(str))
  primary = np.flatnonzero(logs.role == "primary")
  shadow = np.flatnonzero(logs.role == "shadow")
  _, ip, ishadow = np.intersect1d(keys[primary], keys[shadow], return_indices=True)
  return primary[ip], shadow[ishadow]


def _classes(outputs: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray | None:
  if "classes" not in outputs:
    return None
  classes = np.asarray(outputs["classes"])
  return classes.reshape(len(classes), -1)[rows, 0]


def _output_diffs(outputs, p: np.ndarray, s: np.ndarray) -> list[OutputDiff]:
  diffs = []
  for name, values in sorted(outputs.items()):
    if not np.issubdtype(values.dtype, np.floating):
      continue  # class ids and names are compared as classes (agreement), not by size
    a = values[p].reshape(len(p), -1).astype(np.float64)
    b = values[s].reshape(len(s), -1).astype(np.float64)
    per_row = np.abs(a - b).max(axis=1) if a.shape[1] else np.zeros(len(p))
    diffs.append(
      OutputDiff(
        name,
        float(per_row.max()),
        float(per_row.mean()),
        float(np.percentile(per_row, 50)),
        float(np.percentile(per_row, 99)),
        per_row,
      )
    )
  return diffs


def _headline(diffs: list[OutputDiff]) -> OutputDiff | None:
  """The difference that ranks rows and is plotted: the first output's (by name)."""
  return diffs[0] if diffs else None


def _versions(logs, mask) -> list[str]:
  pairs = zip(logs.version[mask].tolist(), logs.version_label[mask].tolist(), strict=True)
  return sorted({f"{v}" + (f" ({label})" if label else "") for v, label in pairs})


def analyze(logs_dir: str, *, top: int = 10, rpc: str = "Predict") -> ShadowResult:
  """Reads and pairs the logs of `rpc` (prediction_log.read_logs); computes every number of
  the report. Raises ShadowError or prediction_log.LogError on bad input."""
  if top < 0:
    raise ShadowError(f"--top={top} must be 0 or more")
  prediction_log.log_files(logs_dir)  # A missing directory fails before TensorFlow loads.
  logs = prediction_log.read_logs(logs_dir, rpc=rpc)
  if logs.num_records == 0:
    raise ShadowError(f"--logs={logs_dir} holds no complete record")
  shadow_errors = logs.errors_by_role.get("shadow", 0)
  shadow_rows = logs.role == "shadow"
  if not shadow_rows.any() and not shadow_errors:
    raise ShadowError(
      f"--logs={logs_dir}: none of its {logs.num_records} records is a shadow copy (role "
      "`shadow`); mirror a label in the traffic config to get some"
    )
  p, s = _pair(logs)
  shadow_requests = len(set(logs.request_id[shadow_rows].tolist()))
  primary_mirrored_ids = set(logs.request_id[p].tolist())
  primary_ids = set(logs.request_id[logs.role == "primary"].tolist())
  unpaired = {
    "primary requests not mirrored": len(primary_ids - primary_mirrored_ids),
    "shadow requests without a logged primary": shadow_requests - len(primary_mirrored_ids),
  }
  first = logs.row_in_request[p] == 0  # one latency per request
  lat_p = logs.latency_us[p][first] / 1e3
  lat_s = logs.latency_us[s][first] / 1e3
  delta = lat_s - lat_p
  cp, cs = _classes(logs.outputs, p), _classes(logs.outputs, s)
  diffs = _output_diffs(logs.outputs, p, s) if len(p) else []
  return ShadowResult(
    logs_dir=logs_dir,
    pairs=len(p),
    paired_requests=int(first.sum()),
    agreement=float(np.mean(cp == cs)) if cp is not None and len(p) else None,
    confusion=_confusion(cp, cs) if cp is not None and len(p) else None,
    diffs=diffs,
    latency_delta_ms={
      "p50": float(np.percentile(delta, 50)) if len(delta) else float("nan"),
      "p99": float(np.percentile(delta, 99)) if len(delta) else float("nan"),
    },
    latency_ms={"primary": lat_p, "shadow": lat_s},
    shadow_records=shadow_requests + shadow_errors,
    shadow_errors=shadow_errors,
    unpaired=unpaired,
    versions={
      "primary": _versions(logs, logs.role == "primary"),
      "shadow": _versions(logs, shadow_rows),
    },
    top=_most_different(logs, p, s, cp, cs, diffs, top),
  )


def _confusion(cp: np.ndarray, cs: np.ndarray) -> np.ndarray | None:
  if not np.issubdtype(cp.dtype, np.integer) or cp.min(initial=0) < 0:
    return None
  size = int(max(cp.max(initial=0), cs.max(initial=0))) + 1
  confusion = np.zeros((size, size), np.int64)
  np.add.at(confusion, (cp, cs), 1)
  return confusion


def _most_different(logs, p, s, cp, cs, diffs, top: int) -> list[dict]:
  if not len(p) or top == 0:
    return []
  headline = _headline(diffs)
  score = headline.per_row if headline else np.zeros(len(p))
  disagree = (cp != cs) if cp is not None else np.zeros(len(p), bool)
  order = np.lexsort((-score, ~disagree))[:top]  # disagreements first, then largest difference
  return [
    {
      "request_id": str(logs.request_id[p[i]]),
      "row": int(logs.row_in_request[p[i]]),
      "primary_class": cp[i].item() if cp is not None else None,
      "shadow_class": cs[i].item() if cs is not None else None,
      **{f"max abs diff {d.name}": float(d.per_row[i]) for d in diffs},
    }
    for i in order
  ]


def markdown(result: ShadowResult, image: str) -> str:
  """The report, from the result (nothing hand-written)."""
  r = result
  error_rate = r.shadow_errors / max(r.shadow_records, 1)
  agreement = "n/a (no `classes` output)" if r.agreement is None else f"{r.agreement:.4%}"
  lines = [
    f"# Shadow report: {r.logs_dir}",
    "",
    f"Primary versions {', '.join(r.versions['primary']) or 'none'}; shadow versions "
    f"{', '.join(r.versions['shadow']) or 'none'}. {r.pairs} rows paired by request id "
    f"({r.paired_requests} requests); unpaired: "
    + ", ".join(f"{k} {v}" for k, v in r.unpaired.items())
    + ".",
    "",
    f"- Class agreement: **{agreement}**",
    f"- Shadow error rate: {error_rate:.2%} ({r.shadow_errors} of {r.shadow_records} shadow "
    "records answered an error)",
    f"- Latency, shadow - primary per request: p50 {r.latency_delta_ms['p50']:+.3f} ms, p99 "
    f"{r.latency_delta_ms['p99']:+.3f} ms",
    "",
    "Output differences per row (max |primary - shadow| over the row's values):",
    "",
    report_format.table(
      ("output", "max", "mean", "p50", "p99"),
      [(d.name, d.max, d.mean, d.p50, d.p99) for d in r.diffs],
    ),
  ]
  if r.top:
    lines += ["", f"The {len(r.top)} most different rows:", ""]
    lines.append(report_format.table(list(r.top[0]), [list(t.values()) for t in r.top]))
  lines += ["", f"![{image}]({image})"]
  return "\n".join(lines) + "\n"


def plot(result: ShadowResult, directory: str) -> str:
  """Output-difference distribution, latency CDFs, and primary x shadow classes."""
  figure = Figure(figsize=(14, 4.2), layout="constrained")
  diff_axes, latency_axes, class_axes = figure.subplots(1, 3)
  d = _headline(result.diffs)
  if d is not None:
    # log10 of the difference; exact agreement (0) is put at the floor and said in the title.
    floor = 1e-9
    diff_axes.hist(np.log10(np.maximum(d.per_row, floor)), bins=40, color="tab:blue")
    zero = int((d.per_row == 0).sum())
    diff_axes.set(title=f"max |diff| of `{d.name}` per row ({zero} exactly 0, at -9)")
    diff_axes.set(xlabel="log10 max |primary - shadow|", ylabel="rows")
  else:
    report_format.no_data(diff_axes, "numeric outputs")
  report_format.latency_cdfs(latency_axes, result.latency_ms)
  if result.confusion is not None:
    image = class_axes.imshow(np.log1p(result.confusion), cmap="Blues")
    figure.colorbar(image, ax=class_axes, label="log(1 + rows)")
    class_axes.set(title=f"Classes (agreement {result.agreement:.2%})")
    class_axes.set(xlabel="shadow class", ylabel="primary class")
  else:
    report_format.no_data(class_axes, "integer classes")
  for axes in (diff_axes, latency_axes):
    axes.grid(alpha=0.3)
  return report_format.save_figure(figure, directory, "shadow.png")


def write(result: ShadowResult, out: str) -> str:
  """Writes shadow.md, shadow.json and shadow.png into `out` (staged, then moved in)."""
  os.makedirs(out, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".shadow-", dir=out)
  try:
    image = plot(result, staging)
    with open(os.path.join(staging, "shadow.md"), "w") as f:
      f.write(markdown(result, image))
    record = dataclasses.asdict(result)
    record.pop("latency_ms")
    record["confusion"] = None if result.confusion is None else result.confusion.tolist()
    for d in record["diffs"]:
      d.pop("per_row")
    with open(os.path.join(staging, "shadow.json"), "w") as f:
      json.dump(record, f, indent=1, default=float)
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return os.path.join(out, "shadow.md")


def main(argv: list[str]) -> int:
  """Runs the CLI on `argv` (argv[0] is the program); returns the exit status."""
  fv = flags.FlagValues()
  flags.DEFINE_string("logs", None, "Directory of prediction log files.", flag_values=fv)
  flags.DEFINE_string("out", None, "Report directory; default LOGS/shadow.", flag_values=fv)
  flags.DEFINE_integer("top", 10, "How many of the most different rows to list.", flag_values=fv)
  flags.DEFINE_enum(
    "rpc", "Predict", list(prediction_log.RPCS), "Pair the records of this RPC.", flag_values=fv
  )
  if cli_help.help_requested(argv[1:]):
    print(cli_help.help_text(__doc__, fv))
    return 0
  try:
    rest = fv(argv)
    if len(rest) > 1:
      raise ShadowError(f"unexpected arguments: {rest[1:]}")
    if not fv.logs:
      raise ShadowError("--logs=DIR (the prediction log directory) is required")
    result = analyze(fv.logs, top=fv.top, rpc=fv.rpc)
    report = write(result, fv.out or os.path.join(fv.logs, "shadow"))
  except (ShadowError, prediction_log.LogError, flags.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  agreement = "n/a" if result.agreement is None else f"{result.agreement:.4f}"
  print(
    f"{result.pairs} rows paired; class agreement {agreement}; shadow errors "
    f"{result.shadow_errors}/{result.shadow_records}; latency delta p50 "
    f"{result.latency_delta_ms['p50']:+.3f} ms"
  )
  print(f"report: {report}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
