"""Model FLOPs and utilization (MFU): how much of the hardware's peak the training step uses."""

from __future__ import annotations

import flax.linen as nn

# Dense bf16 peak TFLOP/s per device, matched against `jax.Device.device_kind` (first match wins).
PEAK_TFLOPS = (
  ("H200", 989.0),
  ("H100", 989.0),
  ("A100", 312.0),
  ("TPU v6", 918.0),
  ("TPU v5p", 459.0),
  ("TPU v5 lite", 197.0),
  ("TPU v5e", 197.0),
  ("TPU v4", 275.0),
)


def peak_tflops(device_kind: str, configured: float) -> float | None:
  """`configured` when set (> 0), else the table's value for `device_kind`, else None."""
  if configured > 0:
    return configured
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def model_flops_per_step(model: nn.Module, input_shape: tuple[int, ...], global_batch: int):
  """Training FLOPs of one step for models that count their own (language models); else None."""
  flops_per_token = getattr(model, "flops_per_token", None)
  if flops_per_token is None:
    return None
  seq_len = input_shape[0]
  return flops_per_token(seq_len) * seq_len * global_batch


def perf_metrics(
  steps_per_sec: float,
  *,
  global_batch: int,
  tokens_per_example: int | None,
  flops_per_step: float | None,
  num_devices: int,
  peak: float | None,
) -> dict[str, float]:
  metrics = {
    "perf/steps_per_sec": steps_per_sec,
    "perf/examples_per_sec": steps_per_sec * global_batch,
  }
  if tokens_per_example:
    metrics["perf/tokens_per_sec"] = steps_per_sec * global_batch * tokens_per_example
    metrics["perf/tokens_per_sec_per_device"] = metrics["perf/tokens_per_sec"] / num_devices
  if flops_per_step:
    tflops = flops_per_step * steps_per_sec / num_devices / 1e12
    metrics["perf/tflops_per_device"] = tflops
    if peak:
      metrics["perf/mfu"] = tflops / peak
  return metrics
