"""The parity gate: the exported SavedModel, run by TensorFlow, must compute what JAX computes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
  from serving.export.signatures import Signature

# Largest allowed max|SavedModel - JAX| / max|JAX| per float output. float32 programs differ only
# by XLA version (TF's bundled XLA against jaxlib's); bfloat16 compute rounds at every op, so two
# compilers fusing differently can disagree in the second or third significant digit.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


class ParityError(AssertionError):
  """An exported signature's output differs from the JAX function's beyond tolerance."""


def check(
  path: str, variables: dict, signature_list: list[Signature], *, dtype: str
) -> dict[str, float]:
  """Runs every signature's golden inputs through TF and JAX; returns each float output's worst
  relative error. Raises ParityError naming the worst element's position and both values."""
  import tensorflow as tf

  tolerance = TOLERANCE[dtype]
  loaded = tf.saved_model.load(path)
  errors = {}
  for signature in signature_list:
    served = loaded.signatures[signature.name](
      **{name: tf.constant(value) for name, value in signature.golden_inputs.items()}
    )
    fn_inputs = signature.golden_fn_inputs or signature.golden_inputs
    expected = jax.device_get(jax.jit(signature.fn)(variables, fn_inputs))
    for name, want in expected.items():
      got, want = served[name].numpy(), np.asarray(want)
      key = f"{signature.name}/{name}"
      if got.shape != want.shape:
        raise ParityError(f"{key}: SavedModel shape {got.shape}, JAX shape {want.shape}")
      if np.issubdtype(want.dtype, np.integer):
        wrong = np.argwhere(got != want)
        if len(wrong):
          at = tuple(int(i) for i in wrong[0])
          raise ParityError(
            f"{key}: {len(wrong)} of {want.size} values differ; first at {at}: "
            f"SavedModel {got[at]}, JAX {want[at]}"
          )
        errors[key] = 0.0
        continue
      diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
      scale = max(float(np.abs(want).max()), np.finfo(np.float32).tiny)
      errors[key] = float(diff.max()) / scale
      if errors[key] > tolerance:
        at = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape))
        raise ParityError(
          f"{key}: relative error {errors[key]:.3e} exceeds {tolerance:.0e} ({dtype}); worst "
          f"element {at}: SavedModel {got[at]!r}, JAX {want[at]!r}"
        )
  return errors
