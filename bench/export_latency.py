r"""Export wall time, and the exported SavedModel's latency against the jitted JAX function.

  .venv/bin/python bench/export_latency.py [--quick]

For the digits CNN, the tiny LM and the 125m LM (briefly trained, so the exports hold real
checkpoints): the wall time of `serving.export.export` (restore, jax2tf, save, parity gate), then,
in one process, the latency of the SavedModel's `serving_default` called in-process through
TensorFlow against the same function jitted in JAX, on the same batch. The ratio is what the TF
runtime costs (or saves) per call. Runs on one CPU device.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
  raise SystemExit("run the benchmark without fake host devices in XLA_FLAGS")

import jax
import numpy as np
from absl import app, flags, logging

from configs import digits_cnn
from configs import lm as lm_config
from serving.export import exporter as export
from serving.export import loading
from trainer import log_filter, train

_QUICK = flags.DEFINE_bool("quick", False, "Fewer timed calls and no 125m LM.")
_CALLS = flags.DEFINE_integer("calls", 200, "Timed calls per function.")


def _digits_config():
  config = digits_cnn.get_config()
  config.optim.warmup_steps = 10
  config.train.num_steps = 50
  config.eval.every_steps = 50
  config.checkpoint.every_steps = 50
  return config


def _lm_config(size: str, steps: int):
  config = lm_config.get_config(f"size={size}")
  config.model.dtype = "float32"
  config.data.max_bytes = 2_000_000
  config.data.seq_len = 128
  config.train.global_batch_size = 4
  config.eval.global_batch_size = 4
  config.eval.max_batches = 1
  config.optim.warmup_steps = 0
  config.train.num_steps = steps
  config.eval.every_steps = steps
  config.checkpoint.every_steps = steps
  return config


def _time_calls(fn, calls: int) -> tuple[float, float]:
  """Median and p99 latency of `fn()` in milliseconds, after three warmup calls."""
  for _ in range(3):
    fn()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times), float(np.percentile(times, 99))


def _measure(name: str, config, root: str, calls: int) -> dict:
  import tensorflow as tf

  workdir = os.path.join(root, name, "run")
  train.train_and_evaluate(config, workdir, jax.devices()[:1])
  start = time.perf_counter()
  result = export.export(workdir, os.path.join(root, name, "models"))
  export_seconds = time.perf_counter() - start

  model = loading.load(workdir)
  serving = next(s for s in export.build_signatures(model, 32) if s.name == "serving_default")
  batch = {k: v[:8] for k, v in serving.golden_inputs.items()}
  jitted = jax.jit(serving.fn)
  saved = tf.saved_model.load(result.path).signatures["serving_default"]
  tf_batch = {k: tf.constant(v) for k, v in batch.items()}
  jax_ms = _time_calls(lambda: jax.block_until_ready(jitted(model.variables, batch)), calls)
  tf_ms = _time_calls(lambda: {k: v.numpy() for k, v in saved(**tf_batch).items()}, calls)
  params = sum(x.size for x in jax.tree.leaves(model.variables))
  return {
    "name": name,
    "params": params,
    "batch": {k: v.shape for k, v in batch.items()},
    "export_s": export_seconds,
    "jax_ms": jax_ms,
    "tf_ms": tf_ms,
  }


def main(argv):
  del argv
  log_filter.quiet_library_info_logs()
  logging.set_verbosity(logging.WARNING)
  calls = 30 if _QUICK.value else _CALLS.value
  cases = [("digits_cnn", _digits_config()), ("lm_tiny", _lm_config("tiny", 20))]
  if not _QUICK.value:
    cases.append(("lm_125m", _lm_config("125m", 2)))
  with tempfile.TemporaryDirectory() as root:
    rows = [_measure(name, config, root, calls) for name, config in cases]
  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, {calls} timed calls each\n")
  print(
    "| model | params | batch | export wall time (s) | JAX jit p50 / p99 (ms) | SavedModel p50 / p99 (ms) | SavedModel / JAX (p50) |"
  )
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    shapes = ", ".join(f"{k} {list(v)}" for k, v in r["batch"].items())
    print(
      f"| {r['name']} | {r['params'] / 1e6:.2f}M | {shapes} | {r['export_s']:.1f} | "
      f"{r['jax_ms'][0]:.2f} / {r['jax_ms'][1]:.2f} | {r['tf_ms'][0]:.2f} / {r['tf_ms'][1]:.2f} | "
      f"{r['tf_ms'][0] / r['jax_ms'][0]:.2f} |"
    )


if __name__ == "__main__":
  app.run(main)
