"""The gate's compatibility checks (the TF Serving release production runs; signatures unchanged
versus the baseline), and the golden inputs the served-path checks send with the JAX function's
answers to them."""

from __future__ import annotations

import os

import numpy as np

from mlops.gate_quality import make_check
from mlops.registry_store import RegistryError
from serving import contract


def signatures(version_dir: str) -> dict[str, dict]:
  """{signature: {"method", "inputs": {name: (dtype, shape)}, "outputs": ...}} of a SavedModel."""
  from tensorflow.core.protobuf import saved_model_pb2

  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())

  def tensors(mapping):
    return {
      k: (int(v.dtype), [int(d.size) for d in v.tensor_shape.dim]) for k, v in mapping.items()
    }

  found = {}
  for meta_graph in proto.meta_graphs:
    for name, sig in meta_graph.signature_def.items():
      if name.startswith("__"):
        continue
      found[name] = {
        "method": sig.method_name,
        "inputs": tensors(sig.inputs),
        "outputs": tensors(sig.outputs),
      }
  return found


def checks(candidate_dir, baseline_dir, release: str, allow_signature_change: bool) -> list[dict]:
  from serving.export import compatibility

  try:
    verdict = compatibility.check_saved_model(candidate_dir, release)
  except ValueError as e:
    raise RegistryError(str(e)) from e
  found = [
    make_check(
      f"compat.tf_serving_{release}",
      None,
      f"runs on TF Serving {release}",
      verdict.compatible,
      verdict.message.split(". ")[0],
    )
  ]
  if baseline_dir is None:
    return found
  mine, theirs = signatures(candidate_dir), signatures(baseline_dir)
  changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
  detail = f"changed: {', '.join(changed)}" if changed else "identical to the baseline's"
  if changed and allow_signature_change:
    detail += " (allowed by --allow_signature_change)"
  found.append(
    make_check(
      "compat.signatures", len(changed), "0 changed", not changed or allow_signature_change, detail
    )
  )
  return found


def golden(model, gate) -> tuple[dict, dict]:
  """(serving_default inputs of the first test examples, what the JAX function of the restored
  `model` answers to them): the export's own signature functions, as its parity gate runs them."""
  import jax

  from trainer.data import load_dataset

  task = model.task
  inputs = task.golden_inputs(load_dataset(model.config.data), gate.served.golden_examples)
  signature = next(
    s
    for s in task.serving_signatures(model, inputs, max_new_tokens=4)
    if s.name == contract.DEFAULT_SIGNATURE
  )
  fn_inputs = signature.golden_fn_inputs or signature.golden_inputs
  expected = jax.device_get(jax.jit(signature.fn)(model.variables, fn_inputs))
  served = {k: np.asarray(v) for k, v in signature.golden_inputs.items()}
  return served, {k: np.asarray(v) for k, v in expected.items()}
