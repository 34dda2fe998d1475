r"""Trainer overhead vs a minimal jit loop, and how long a checkpoint save blocks the loop (issue 2).

  .venv/bin/python bench/trainer_overhead.py          # default: ~2 minutes on 2 CPU cores
  .venv/bin/python bench/trainer_overhead.py --quick  # sanity run, ~30 seconds

Part 1 trains the same model on the same synthetic data two ways, interleaved `--repeats` times:
  * trainer: `trainer.train.train_and_evaluate` (grain pipeline, metrics read back and logged every
    100 steps, async checkpoints every 500 steps, one eval at the end); its `steps_per_sec`
    excludes the first (compiling) step and the eval;
  * minimal: `jax.jit` of a hand-written step (same flax model, same optax optimizer, same loss)
    over batches pre-built as numpy arrays, `jax.device_put` each step, timed after a warmup
    step up to `block_until_ready`.
A third row runs the minimal loop with the trainer's own jitted step (`build_experiment`), which
splits the trainer's overhead into "step function" and "loop, data pipeline and checkpoints".

Part 2 times `Checkpointer.save` on a real (larger) train state with async_save on and off: how
long the call blocks the training loop, and how long until the checkpoint is complete.

Run on one CPU device (no --xla_force_host_platform_device_count). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import cProfile
import dataclasses
import datetime
import gc
import io
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging

import models
from configs import base
from trainer import checkpointing, input_pipeline, steps, train
from trainer.data_sources import load_dataset
from trainer.optimizers import create_optimizer

_QUICK = flags.DEFINE_bool("quick", False, "Sanity run: few steps, one repeat, a small state.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 3000, "Train steps per run (part 1).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved runs of each variant (part 1).")
_MODEL = flags.DEFINE_string("model", "mlp", "A name from models.MODELS (part 1).")
_INPUT_SHAPE = flags.DEFINE_list("input_shape", ["16", "16", "3"], "Synthetic example shape.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch (part 1).")
_CKPT_INPUT_SHAPE = flags.DEFINE_list(
    "ckpt_input_shape",
    ["128", "128", "3"],
    "Synthetic example shape for part 2; the mlp's first kernel is prod(shape) x 256.",
)
_CKPT_REPEATS = flags.DEFINE_integer("ckpt_repeats", 5, "Timed saves of each kind (part 2).")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "Also run the trainer once under cProfile and print its hottest functions."
)
_TMP_ROOT = flags.DEFINE_string("tmp_root", None, "Where workdirs go (default: system temp).")


@dataclasses.dataclass(frozen=True)
class SaveTiming:
  # How long `Checkpointer.save` blocked the caller.
  blocking_ms: float
  # Until `wait_until_finished` returned: the checkpoint is complete on disk.
  total_ms: float


def throughput_config(
    *, model: str, input_shape: tuple[int, ...], batch_size: int, num_steps: int
) -> ml_collections.ConfigDict:
  """The base config on synthetic data, logging every 100 steps, checkpoints every 500."""
  config = base.get_base_config()
  config.data.name = "synthetic"
  config.data.synthetic_input_shape = input_shape
  config.model.name = model
  config.model.dropout_rate = 0.0
  config.train.num_steps = num_steps
  config.train.global_batch_size = batch_size
  config.train.log_every_steps = 100
  # Eval only once, at the end (excluded from the trainer's steps_per_sec).
  config.eval.every_steps = num_steps
  config.checkpoint.every_steps = 500
  # No extra saves at evals.
  config.checkpoint.keep_best = 0
  config.checkpoint.async_save = True
  return config


def checkpoint_config(input_shape: tuple[int, ...]) -> ml_collections.ConfigDict:
  """An mlp whose first kernel is large, so saving its state moves a visible amount of data."""
  config = base.get_base_config()
  config.data.name = "synthetic"
  config.data.synthetic_input_shape = input_shape
  # Few examples: they only feed the train step run between saves.
  config.data.synthetic_train_examples = 128
  config.data.synthetic_eval_examples = 64
  config.model.name = "mlp"
  config.train.global_batch_size = 32
  config.checkpoint.keep_best = 0
  # Nothing is deleted while timing: the saves are measured alone.
  config.checkpoint.keep_last = 1000
  return config


def run_trainer(config: ml_collections.ConfigDict, tmp_root: str) -> float:
  """Steps/sec that `train_and_evaluate` reports, in a fresh workdir (a reused one would resume)."""
  workdir = tempfile.mkdtemp(prefix="trainer_", dir=tmp_root)
  try:
    result = train.train_and_evaluate(config, workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if result.step != config.train.num_steps:
    raise RuntimeError(f"trainer stopped at step {result.step} of {config.train.num_steps}")
  return result.steps_per_sec


def host_batches(config: ml_collections.ConfigDict) -> list[dict[str, np.ndarray]]:
  """One epoch of the synthetic training set as numpy batches, the examples the trainer reads."""
  source = load_dataset(config.data).train
  size = config.train.global_batch_size
  return [
      {"inputs": source.inputs[i : i + size], "labels": source.labels[i : i + size]}
      for i in range(0, len(source) - size + 1, size)
  ]


def minimal_train_step(config: ml_collections.ConfigDict) -> tuple[Callable, Callable]:
  """`(init(rng) -> carry, step(carry, batch) -> (carry, loss))`, jitted, nothing else."""
  dataset = load_dataset(config.data)
  model = models.get_model(
      config.model.name,
      num_classes=dataset.num_classes,
      dtype=config.model.dtype,
      dropout_rate=config.model.dropout_rate,
  )
  tx = create_optimizer(config.optim, config.train.num_steps).tx

  def init(rng):
    dummy = jnp.zeros((1, *dataset.input_shape), jnp.float32)
    params = nn.meta.unbox(model.init(rng, dummy, train=False)["params"])
    return params, tx.init(params)

  def step(carry, batch):
    params, opt_state = carry

    def loss_fn(params):
      inputs = steps.normalize(batch["inputs"], dataset.mean, dataset.std)
      logits = model.apply({"params": params}, inputs, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(init), jax.jit(step, donate_argnums=(0,))


def time_loop(
    step: Callable, carry, batches: list[dict[str, np.ndarray]], num_steps: int
) -> float:
  """Steps/sec of `num_steps - 1` steps after one warmup (compiling) step."""
  carry, out = step(carry, jax.device_put(batches[0]))
  jax.block_until_ready((carry, out))
  start = time.perf_counter()
  for i in range(1, num_steps):
    carry, out = step(carry, jax.device_put(batches[i % len(batches)]))
  jax.block_until_ready((carry, out))
  return (num_steps - 1) / (time.perf_counter() - start)


def run_minimal(config: ml_collections.ConfigDict, batches, step_fns) -> float:
  init, step = step_fns
  return time_loop(step, init(jax.random.PRNGKey(config.seed)), batches, config.train.num_steps)


def run_trainer_step(config: ml_collections.ConfigDict, batches) -> float:
  """The minimal loop around the trainer's own jitted step (metrics and all)."""
  experiment = train.build_experiment(config)
  state = experiment.init_state(jax.random.PRNGKey(config.seed))
  return time_loop(experiment.train_step, state, batches, config.train.num_steps)


def time_saves(config: ml_collections.ConfigDict, repeats: int, tmp_root: str) -> dict:
  """`{async_save: [SaveTiming]}`, the two kinds interleaved, a train step before every save."""
  experiment = train.build_experiment(config)
  state = experiment.init_state(jax.random.PRNGKey(config.seed))
  data_iterator = input_pipeline.train_iterator(
      experiment.dataset,
      global_batch_size=config.train.global_batch_size,
      seed=config.seed,
      shuffle=config.data.shuffle,
      worker_threads=config.data.worker_threads,
      prefetch_batches=config.data.prefetch_batches,
      sharding=experiment.batch_sharding,
  )
  kinds = (True, False)
  workdirs, checkpointers = {}, {}
  for async_save in kinds:
    workdirs[async_save] = tempfile.mkdtemp(prefix=f"ckpt_async{int(async_save)}_", dir=tmp_root)
    options = ml_collections.ConfigDict(config.checkpoint.to_dict())
    options.async_save = async_save
    checkpointers[async_save] = checkpointing.Checkpointer(
        workdirs[async_save], options, best_metric="eval/accuracy", best_mode="max"
    )
  timings = {kind: [] for kind in kinds}
  try:
    # Round 0 is a warmup: the first save creates directories and starts Orbax's machinery.
    for round_index in range(repeats + 1):
      for async_save in kinds:
        # Fresh device arrays, as in training: nothing cached from the previous save.
        state, metrics = experiment.train_step(state, next(data_iterator))
        jax.block_until_ready((state, metrics))
        checkpointer = checkpointers[async_save]
        start = time.perf_counter()
        checkpointer.save(state, data_iterator, config)
        returned = time.perf_counter()
        checkpointer.wait_until_finished()
        finished = time.perf_counter()
        if round_index:
          timings[async_save].append(
              SaveTiming(1e3 * (returned - start), 1e3 * (finished - start))
          )
    step = checkpointers[True].latest_step()
    size = _dir_bytes(os.path.join(checkpointing.checkpoint_dir(workdirs[True]), str(step)))
  finally:
    for async_save in kinds:
      checkpointers[async_save].close()
      shutil.rmtree(workdirs[async_save], ignore_errors=True)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return {"timings": timings, "checkpoint_bytes": size, "num_params": num_params}


def _dir_bytes(path: str) -> int:
  return sum(
      os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
  )


def profile_trainer(config: ml_collections.ConfigDict, tmp_root: str) -> str:
  """The main thread's hottest functions during one trainer run (cProfile, by own time)."""
  profiler = cProfile.Profile()
  profiler.enable()
  run_trainer(config, tmp_root)
  profiler.disable()
  out = io.StringIO()
  pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
  return out.getvalue()


def machine_description() -> list[str]:
  versions = ", ".join(
      f"{name} {metadata.version(name)}"
      for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
  )
  return [
      f"date: {datetime.date.today().isoformat()}",
      f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
      f"({len(os.sched_getaffinity(0))} usable), {platform.platform()}",
      f"python {platform.python_version()}; {versions}",
      f"JAX devices: {jax.device_count()} x {jax.devices()[0].device_kind}",
  ]


def _median(values: list[float]) -> float:
  return statistics.median(values)


def _table(header: list[str], rows: list[list[str]]) -> str:
  """A markdown table, so the output pastes into docs/benchmarks.md as is."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    raise app.UsageError(
        "XLA_FLAGS forces several host devices; unset it: this benchmark runs on one CPU device"
    )
  logging.set_verbosity(logging.WARNING)  # Orbax and grain log every save and pipeline at INFO.
  num_steps, repeats, ckpt_repeats = _NUM_STEPS.value, _REPEATS.value, _CKPT_REPEATS.value
  ckpt_shape = tuple(int(d) for d in _CKPT_INPUT_SHAPE.value)
  if _QUICK.value:
    num_steps, repeats, ckpt_repeats, ckpt_shape = 300, 1, 2, (32, 32, 3)
  config = throughput_config(
      model=_MODEL.value,
      input_shape=tuple(int(d) for d in _INPUT_SHAPE.value),
      batch_size=_BATCH_SIZE.value,
      num_steps=num_steps,
  )
  if _QUICK.value:
    config.checkpoint.every_steps = 100
  tmp_root = tempfile.mkdtemp(prefix="trainer_overhead_", dir=_TMP_ROOT.value)
  wall_start = time.perf_counter()
  try:
    batches = host_batches(config)
    step_fns = minimal_train_step(config)
    rates = {"trainer": [], "minimal": [], "minimal_trainer_step": []}
    for repeat in range(repeats):
      gc.collect()
      rates["trainer"].append(run_trainer(config, tmp_root))
      gc.collect()
      rates["minimal"].append(run_minimal(config, batches, step_fns))
      gc.collect()
      rates["minimal_trainer_step"].append(run_trainer_step(config, batches))
      print(
          f"repeat {repeat + 1}/{repeats}: "
          + ", ".join(f"{name} {values[-1]:.1f}" for name, values in rates.items())
          + " steps/s",
          flush=True,
      )
    saves = time_saves(checkpoint_config(ckpt_shape), ckpt_repeats, tmp_root)
    profile = profile_trainer(config, tmp_root) if _PROFILE.value else None
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)

  medians = {name: _median(values) for name, values in rates.items()}
  minimal = medians["minimal"]
  shape = "x".join(map(str, config.data.synthetic_input_shape))
  print()
  print("command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]))
  print("\n".join(machine_description()))
  print(
      f"\nPart 1: model {config.model.name}, synthetic {shape} inputs, batch "
      f"{config.train.global_batch_size}, {num_steps} steps per run, median of {repeats} "
      f"interleaved runs (steps/s after the first step)\n"
  )
  descriptions = {
      "trainer": "train_and_evaluate (log/100, async ckpt/500)",
      "minimal": "minimal jit loop, hand-written step",
      "minimal_trainer_step": "minimal jit loop, trainer's step fn",
  }
  print(
      _table(
          ["variant", "median steps/s", "ms/step", "vs minimal", "runs (steps/s)"],
          [
              [
                  descriptions[name],
                  f"{medians[name]:.1f}",
                  f"{1e3 / medians[name]:.3f}",
                  f"{medians[name] / minimal:.3f}",
                  ", ".join(f"{v:.1f}" for v in values),
              ]
              for name, values in rates.items()
          ],
      )
  )
  ratio = medians["trainer"] / minimal
  print(f"\ntrainer / minimal = {ratio:.3f} (target >= 0.97: {'met' if ratio >= 0.97 else 'NOT met'})")

  timings = saves["timings"]
  print(
      f"\nPart 2: Checkpointer.save of an mlp state on {'x'.join(map(str, ckpt_shape))} inputs "
      f"({saves['num_params'] / 1e6:.1f}M params, {saves['checkpoint_bytes'] / 2**20:.0f} MiB "
      f"on disk), median of {ckpt_repeats} saves each (ms)\n"
  )
  blocking = {kind: _median([t.blocking_ms for t in ts]) for kind, ts in timings.items()}
  total = {kind: _median([t.total_ms for t in ts]) for kind, ts in timings.items()}
  print(
      _table(
          ["async_save", "save() blocks (ms)", "save + wait_until_finished (ms)", "runs blocking"],
          [
              [
                  str(kind),
                  f"{blocking[kind]:.1f}",
                  f"{total[kind]:.1f}",
                  ", ".join(f"{t.blocking_ms:.1f}" for t in timings[kind]),
              ]
              for kind in (True, False)
          ],
      )
  )
  print(
      f"\nblocking async / sync = {blocking[True] / blocking[False]:.3f} "
      f"(the loop waits {blocking[False] / blocking[True]:.1f}x less with async_save)"
  )
  if profile:
    print("\ncProfile of one trainer run (main thread, by own time):\n" + profile)
  print(f"total benchmark time: {time.perf_counter() - wall_start:.0f} s")


if __name__ == "__main__":
  app.run(main)
