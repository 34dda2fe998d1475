r"""A command-line gRPC client for TF Serving (this project's server or the real one).

  python -m serving.client --server=localhost:8500 --model=digits --input=batch.json [--json]
  python -m serving.client --server=localhost:8500 --model=digits --metadata
  python -m serving.client --server=localhost:8500 --model=digits --status
  python -m serving.client --server=localhost:8500 --model=lm --text="def main("

`--input` is JSON ({"inputs": [[...]]}, {"inputs": {"name": [...]}}, {"instances": [...]} or a
bare list) or an .npz of named arrays. Values are cast to the dtypes the signature declares (read
from the server's metadata). `--text` sends a prompt to a language model's `generate` signature
as byte tokens and prints the decoded continuation. The client needs the TF Serving protos and
gRPC, not the TensorFlow runtime, so it starts in a fraction of a second. Exits 1 when the server
is unreachable or answers an error.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
from absl import app, flags

from serving import contract, lm_text
from serving.model_client import (
  DEFAULT_SIGNATURE,
  ClientError,
  Connection,
  ModelClient,
  dtype_name,
  numpy_dtype,
)

_SERVER = flags.DEFINE_string("server", "localhost:8500", "host:port of the gRPC API.")
_MODEL = flags.DEFINE_string("model", None, "Model name.")
_VERSION = flags.DEFINE_integer("version", None, "Model version; default: the latest.")
_VERSION_LABEL = flags.DEFINE_string("version_label", "", "Version label instead of --version.")
_SIGNATURE = flags.DEFINE_string("signature_name", "", "Signature; default: serving_default.")
_INPUT = flags.DEFINE_string("input", None, "A .json or .npz file of inputs to Predict.")
_TEXT = flags.DEFINE_string(
  "text",
  None,
  "A prompt for a language model (its generate or sample signature); prints the continuation.",
)
_TEMPERATURE = flags.DEFINE_float(
  "temperature", 0.0, "--text: 0 is greedy (the generate signature)."
)
_TOP_K = flags.DEFINE_integer("top_k", 0, "--text: sample among the k most likely; 0: all.")
_SEED = flags.DEFINE_integer("seed", 0, "--text: the sampling seed (the same seed repeats).")
_METADATA = flags.DEFINE_bool("metadata", False, "Print the model's signatures.")
_STATUS = flags.DEFINE_bool("status", False, "Print the model's version states.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
_TIMEOUT = flags.DEFINE_float("timeout_seconds", 30.0, "Deadline of each RPC.")


def read_inputs(path: str, signature_def) -> dict[str, np.ndarray]:
  """Named arrays from a JSON or .npz file, cast to the signature's dtypes."""
  names = sorted(signature_def.inputs)
  try:
    if path.endswith(".npz"):
      with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
      if list(data) == ["arr_0"] and len(names) == 1:
        data = {names[0]: data["arr_0"]}
    else:
      with open(path) as f:
        data = json.load(f)
      if isinstance(data, dict):
        data = data.get("inputs", data.get("instances", data))
      if isinstance(data, list) and data and all(isinstance(row, dict) for row in data):
        data = {k: [row[k] for row in data] for k in data[0]}
      if not isinstance(data, dict):
        if len(names) != 1:
          raise ClientError(f"{path}: the signature takes inputs {names}; name them in a dict")
        data = {names[0]: data}
  except (OSError, ValueError, KeyError) as e:
    raise ClientError(f"cannot read inputs from {path}: {e}") from e
  arrays = {}
  for name, value in data.items():
    if name not in signature_def.inputs:
      raise ClientError(f"{path}: input {name!r} is not one of the signature's inputs {names}")
    dtype = numpy_dtype(signature_def.inputs[name].dtype)
    try:
      arrays[name] = np.asarray(value).astype(dtype)
    except (ValueError, TypeError) as e:
      raise ClientError(f"{path}: input {name!r} is not a rectangular numeric array: {e}") from e
  return arrays


def signature_summary(signature_defs) -> dict:
  """{signature: {"inputs"/"outputs": {tensor: {"dtype", "shape"}}}}; shape None for an
  unknown rank, -1 for a dimension of any size. Internal (`__...`) signatures are left out."""

  def describe(infos):
    return {
      name: {
        "dtype": dtype_name(info.dtype),
        "shape": None
        if info.tensor_shape.unknown_rank
        else [d.size for d in info.tensor_shape.dim],
      }
      for name, info in sorted(infos.items())
    }

  return {
    name: {"inputs": describe(d.inputs), "outputs": describe(d.outputs)}
    for name, d in sorted(signature_defs.items())
    if not name.startswith(contract.INTERNAL_SIGNATURE_PREFIX)
  }


def signature_table(summary: dict) -> str:
  """The signatures as aligned columns: signature, input/output, tensor, dtype, shape."""
  rows = [("signature", "kind", "tensor", "dtype", "shape")]
  for name, s in summary.items():
    for kind in ("inputs", "outputs"):
      for tensor, spec in s[kind].items():
        shape = "unknown" if spec["shape"] is None else str(spec["shape"])
        rows.append((name, kind[:-1], tensor, spec["dtype"], shape))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join(
    "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
    for row in rows
  )


def _format_values(row: np.ndarray, limit: int = 10) -> str:
  flat = np.asarray(row).reshape(-1)
  text = " ".join(
    f"{v:.4g}" if isinstance(v, float | np.floating) else str(v) for v in flat[:limit]
  )
  return text + (f" ... ({flat.size} values)" if flat.size > limit else "")


def _print_predictions(version: int, outputs: dict[str, np.ndarray]) -> None:
  print(f"version {version}")
  batch = min((len(v) for v in outputs.values() if v.ndim), default=0)
  names = list(outputs)
  print("row  " + "  ".join(names))
  for i in range(batch):
    print(f"{i:<4} " + "  ".join(_format_values(outputs[n][i]) for n in names))


def _print_status(result: list[dict]) -> None:
  if _JSON.value:
    print(json.dumps(result, indent=2))
    return
  for s in result:
    print(f"version {s['version']}: {s['state']}" + (f" ({s['error']})" if s["error"] else ""))


def _print_text(client: ModelClient, signature_defs: dict) -> None:
  sampling = lm_text.Sampling(_TEMPERATURE.value, _TOP_K.value, _SEED.value)
  generated = lm_text.generate_text(client, signature_defs, _TEXT.value, sampling)
  if _JSON.value:
    print(json.dumps(dataclasses.asdict(generated)))
  else:
    print(generated.text)


def _predict(client: ModelClient, signature_defs: dict) -> None:
  signature_name = _SIGNATURE.value or DEFAULT_SIGNATURE
  if signature_name not in signature_defs:
    raise ClientError(f"the model has no signature {signature_name!r}: {sorted(signature_defs)}")
  inputs = read_inputs(_INPUT.value, signature_defs[signature_name])
  served, outputs = client.predict(inputs, signature_name)
  if _JSON.value:
    print(json.dumps({"version": served, "outputs": {k: v.tolist() for k, v in outputs.items()}}))
  else:
    _print_predictions(served, outputs)


def run(connection: Connection) -> None:
  """Does what the flags ask of the model `connection` names; raises ClientError."""
  if _INPUT.value and _TEXT.value:
    raise ClientError("give --input or --text, not both")
  with ModelClient(connection) as client:
    if _STATUS.value:
      _print_status(client.status())
      return
    signature_defs = client.signatures()
    if _TEXT.value is not None:
      _print_text(client, signature_defs)
    elif _METADATA.value or not _INPUT.value:
      summary = signature_summary(signature_defs)
      print(json.dumps(summary, indent=2) if _JSON.value else signature_table(summary))
    else:
      _predict(client, signature_defs)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run(
      Connection(
        _SERVER.value, _MODEL.value or "", _VERSION.value, _VERSION_LABEL.value, _TIMEOUT.value
      )
    )
  except ClientError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
