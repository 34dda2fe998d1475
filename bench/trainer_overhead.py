r"""Trainer overhead vs a minimal jit loop, and how long a checkpoint save blocks the loop (issue 2).

  .venv/bin/python bench/trainer_overhead.py          # default: about 2.5 minutes on 2 CPU cores
  .venv/bin/python bench/trainer_overhead.py --quick  # sanity run, ~30 seconds

Part 1 trains the same model on the same synthetic data, each variant once per repeat, the
variants interleaved so that drift in machine speed hits them all alike:
  * trainer: `trainer.train.train_and_evaluate` as is (grain input pipeline, metrics read back
    and logged every 100 steps, async checkpoints every 500 steps, one eval at the end); its
    `steps_per_sec` excludes the first (compiling) step and the eval;
  * minimal: `jax.jit` of a hand-written step (same flax model, same optax optimizer, same loss)
    over batches pre-built as numpy arrays, `jax.device_put` each step, timed after one warmup
    step up to `block_until_ready`.
Two diagnostic rows split the gap between them:
  * the minimal loop around the trainer's own jitted step (`build_experiment(...).train_step`):
    what the step function's extra metrics cost;
  * the trainer with its input pipeline swapped (in this process only) for one that reads each
    batch with a single fancy-index per array: what the per-example grain pipeline costs.
It also times each input pipeline alone (no training), in batches/s.

Part 2 times `Checkpointer.save` with async_save on and off, on the state of part 1's model and
on a larger one: how long the call blocks the training loop, and how long until the checkpoint
is complete.

Run on one CPU device (no --xla_force_host_platform_device_count). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import cProfile
import dataclasses
import datetime
import gc
import io
import logging as py_logging
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from unittest import mock

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from grain import experimental as grain_experimental

import models
from configs import base
from trainer import checkpointing, input_pipeline, tasks, train
from trainer.data_sources import ArraySource, Dataset, load_dataset
from trainer.optimizers import create_optimizer

_QUICK = flags.DEFINE_bool("quick", False, "Sanity run: few steps, one repeat, a small state.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 1000, "Train steps per run (part 1).")
_REPEATS = flags.DEFINE_integer("repeats", 4, "Interleaved runs of each variant (part 1).")
_MODEL = flags.DEFINE_string(
  "model", "mlp", "Part 1 model: a classifier from models.MODELS without BatchNorm (mlp, cnn, ...)."
)
_INPUT_SHAPE = flags.DEFINE_list("input_shape", ["16", "16", "3"], "Synthetic example shape.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch (part 1).")
_PIPELINE_BATCHES = flags.DEFINE_integer(
  "pipeline_batches", 400, "Batches read when timing an input pipeline alone."
)
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

# Orbax warns at every save without metrics when best_fn is set, which Checkpointer always does.
_ORBAX_NO_METRICS_WARNING = "Requested `tracked_metric`; did not provide metrics."


@dataclasses.dataclass(frozen=True)
class Variant:
  description: str
  run: Callable[[], float]


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


def checkpoint_config(model: str, input_shape: tuple[int, ...]) -> ml_collections.ConfigDict:
  """A state to save; an mlp's first kernel is prod(input_shape) x 256, so it grows with the input."""
  config = base.get_base_config()
  config.data.name = "synthetic"
  config.data.synthetic_input_shape = input_shape
  # Few examples: they only feed the train step run between saves.
  config.data.synthetic_train_examples = 128
  config.data.synthetic_eval_examples = 64
  config.model.name = model
  config.model.dropout_rate = 0.0
  config.train.global_batch_size = 32
  config.checkpoint.keep_best = 0
  # Nothing is deleted while timing: the saves are measured alone.
  config.checkpoint.keep_last = 1000
  return config


# --- Part 1: the trainer ------------------------------------------------------------------------


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


class ShuffledBatches:
  """Batch `index` of an endless stream of per-epoch permutations of an in-memory source.

  One fancy-index per array instead of grain's per-example `__getitem__`, shuffle and stack.
  Like the trainer's pipeline, batches may span an epoch boundary. Thread-safe: a race on the
  permutation cache only computes the same permutation twice.
  """

  def __init__(self, source: ArraySource, batch_size: int, seed: int, shuffle: bool):
    self._inputs = source.inputs[jax.process_index() :: jax.process_count()]
    self._labels = source.labels[jax.process_index() :: jax.process_count()]
    self._batch_size, self._seed, self._shuffle = batch_size, seed, shuffle
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      n = len(self._labels)
      order = np.arange(n)
      if self._shuffle:
        order = np.random.default_rng((self._seed, epoch)).permutation(n)
      self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
      self._orders[epoch] = order
    return self._orders[epoch]

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    positions = np.arange(index * self._batch_size, (index + 1) * self._batch_size)
    epochs, offsets = np.divmod(positions, len(self._labels))
    rows = np.concatenate([self._order(e)[offsets[epochs == e]] for e in np.unique(epochs)])
    return {"inputs": self._inputs[rows], "labels": self._labels[rows]}


def batched_train_iterator(
  dataset: Dataset,
  *,
  global_batch_size: int,
  seed: int,
  shuffle: bool,
  worker_threads: int,
  prefetch_batches: int,
  sharding: jax.sharding.NamedSharding,
) -> grain.DatasetIterator:
  """`input_pipeline.train_iterator` with batch-level reads; same prefetching, checkpointable."""
  local_batch = global_batch_size // jax.process_count()
  batches = ShuffledBatches(dataset.train, local_batch, seed, shuffle)
  ds = grain.MapDataset.range(2**62).map(batches)
  read_options = grain.ReadOptions(
    num_threads=worker_threads, prefetch_buffer_size=prefetch_batches
  )
  iter_ds = grain_experimental.ThreadPrefetchIterDataset(
    ds.to_iter_dataset(read_options), prefetch_buffer_size=prefetch_batches
  )
  iter_ds = grain_experimental.ThreadPrefetchIterDataset(
    iter_ds.map(
      lambda batch: {
        k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()
      }
    ),
    prefetch_buffer_size=2,
  )
  return iter(iter_ds)


def run_trainer_batched_input(config: ml_collections.ConfigDict, tmp_root: str) -> float:
  with mock.patch.object(input_pipeline, "train_iterator", batched_train_iterator):
    return run_trainer(config, tmp_root)


def pipeline_batches_per_sec(
  make_iterator: Callable[..., Iterator], config: ml_collections.ConfigDict, num_batches: int
) -> float:
  """How fast an input pipeline alone delivers device batches, after its first batch."""
  experiment = train.build_experiment(config)
  iterator = make_iterator(
    experiment.dataset,
    global_batch_size=config.train.global_batch_size,
    seed=config.seed,
    shuffle=config.data.shuffle,
    worker_threads=config.data.worker_threads,
    prefetch_batches=config.data.prefetch_batches,
    sharding=experiment.batch_sharding,
  )
  jax.block_until_ready(next(iterator))
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  jax.block_until_ready(batch)
  rate = num_batches / (time.perf_counter() - start)
  iterator.close()
  return rate


# --- Part 1: the minimal loop -------------------------------------------------------------------


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
  model = models.get_model(config.model, num_outputs=dataset.num_classes)
  tx = create_optimizer(config.optim, config.train.num_steps).tx

  def init(rng):
    dummy = jnp.zeros((1, *dataset.input_shape), jnp.float32)
    params = nn.meta.unbox(model.init(rng, dummy, train=False)["params"])
    return params, tx.init(params)

  def step(carry, batch):
    params, opt_state = carry

    def loss_fn(params):
      inputs = tasks.normalize(batch["inputs"], dataset.mean, dataset.std)
      logits = model.apply({"params": params}, inputs, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(init), jax.jit(step, donate_argnums=(0,))


def time_loop(step: Callable, carry, batches: list[dict[str, np.ndarray]], num_steps: int) -> float:
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


def run_minimal_trainer_step(config: ml_collections.ConfigDict, batches) -> float:
  """The minimal loop around the trainer's own jitted step (metrics and all)."""
  experiment = train.build_experiment(config)
  state = experiment.init_state(jax.random.PRNGKey(config.seed))
  return time_loop(experiment.train_step, state, batches, config.train.num_steps)


# --- Part 2: checkpoint saves -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SaveResult:
  label: str
  num_params: int
  checkpoint_bytes: int
  # By async_save (True, False).
  timings: dict[bool, list[SaveTiming]]


def time_saves(
  label: str, config: ml_collections.ConfigDict, repeats: int, tmp_root: str
) -> SaveResult:
  """Times `repeats` saves of each kind, interleaved, with a train step before every save."""
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
          timings[async_save].append(SaveTiming(1e3 * (returned - start), 1e3 * (finished - start)))
    step = checkpointers[True].latest_step()
    size = _dir_bytes(os.path.join(checkpointing.checkpoint_dir(workdirs[True]), str(step)))
  finally:
    for async_save in kinds:
      checkpointers[async_save].close()
      shutil.rmtree(workdirs[async_save], ignore_errors=True)
    data_iterator.close()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return SaveResult(label, num_params, size, timings)


def _dir_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
  )


# --- Reporting ----------------------------------------------------------------------------------


def profile_trainer(config: ml_collections.ConfigDict, tmp_root: str) -> str:
  """The main thread's hottest functions during one trainer run (cProfile, by own time)."""
  profiler = cProfile.Profile()
  profiler.enable()
  run_trainer(config, tmp_root)
  profiler.disable()
  out = io.StringIO()
  pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
  return out.getvalue()


def machine_description() -> list[str]:
  versions = ", ".join(
    f"{name} {metadata.version(name)}"
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
  )
  return [
    f"date: {datetime.date.today().isoformat()}",
    f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
    f"{platform.machine()}, {platform.platform()}",
    f"python {platform.python_version()}; {versions}",
    f"JAX devices: {jax.device_count()} x {jax.devices()[0].device_kind}",
  ]


def _table(header: list[str], rows: list[list[str]]) -> str:
  """A markdown table, so the output pastes into docs/benchmarks.md as is."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def report_throughput(
  config: ml_collections.ConfigDict,
  variants: dict[str, Variant],
  rates: dict[str, list[float]],
  pipelines: dict[str, float],
) -> str:
  minimal = rates["minimal"]
  medians = {name: statistics.median(values) for name, values in rates.items()}
  rows = []
  for name, values in rates.items():
    paired = statistics.median(v / m for v, m in zip(values, minimal, strict=True))
    rows.append(
      [
        variants[name].description,
        f"{medians[name]:.1f}",
        f"{1e3 / medians[name]:.2f}",
        f"{medians[name] / medians['minimal']:.3f}",
        f"{paired:.3f}",
        ", ".join(f"{v:.0f}" for v in values),
      ]
    )
  ratio = medians["trainer"] / medians["minimal"]
  shape = "x".join(map(str, config.data.synthetic_input_shape))
  batch = config.train.global_batch_size
  return "\n".join(
    [
      f"Part 1: model {config.model.name}, synthetic {shape} inputs, batch {batch}, "
      f"{config.train.num_steps} steps per run, {len(minimal)} interleaved runs of each; "
      "steps/s after the first (compiling) step",
      "",
      _table(
        [
          "variant",
          "median steps/s",
          "ms/step",
          "median / minimal's",
          "median of per-run ratios",
          "runs (steps/s)",
        ],
        rows,
      ),
      "",
      f"trainer / minimal = {ratio:.3f} (target >= 0.97: {'met' if ratio >= 0.97 else 'NOT met'})",
      "",
      f"Input pipelines alone (no training), batches of {batch}:",
      "",
      _table(
        ["pipeline", "batches/s", "ms/batch"],
        [[name, f"{rate:.1f}", f"{1e3 / rate:.2f}"] for name, rate in pipelines.items()],
      ),
    ]
  )


def report_saves(results: list[SaveResult]) -> str:
  rows, ratios = [], []
  for result in results:
    blocking, total = {}, {}
    for kind, timings in result.timings.items():
      blocking[kind] = statistics.median(t.blocking_ms for t in timings)
      total[kind] = statistics.median(t.total_ms for t in timings)
      rows.append(
        [
          f"{result.label}: {result.num_params / 1e6:.2f}M params, "
          f"{result.checkpoint_bytes / 2**20:.1f} MiB",
          str(kind),
          f"{blocking[kind]:.1f}",
          f"{total[kind]:.1f}",
          ", ".join(f"{t.blocking_ms:.0f}" for t in timings),
        ]
      )
    ratios.append(
      f"{result.label}: blocking async / sync = {blocking[True] / blocking[False]:.3f} "
      f"({blocking[False] / blocking[True]:.1f}x less), "
      f"completion async / sync = {total[True] / total[False]:.2f}"
    )
  repeats = len(results[0].timings[True])
  return "\n".join(
    [
      f"Part 2: Checkpointer.save, median of {repeats} saves of each kind, interleaved (ms)",
      "",
      _table(
        [
          "state (checkpoint size)",
          "async_save",
          "save() blocks the loop",
          "save + wait_until_finished",
          "runs, blocking",
        ],
        rows,
      ),
      "",
      *ratios,
    ]
  )


class _DropMessage(py_logging.Filter):
  def __init__(self, message: str):
    super().__init__()
    self._message = message

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.getMessage() != self._message


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    raise app.UsageError(
      "XLA_FLAGS forces several host devices; unset it: this benchmark runs on one CPU device"
    )
  # Orbax and grain log every save and pipeline detail at INFO.
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_DropMessage(_ORBAX_NO_METRICS_WARNING))

  num_steps, repeats, ckpt_repeats = _NUM_STEPS.value, _REPEATS.value, _CKPT_REPEATS.value
  input_shape = tuple(int(d) for d in _INPUT_SHAPE.value)
  ckpt_shape = tuple(int(d) for d in _CKPT_INPUT_SHAPE.value)
  pipeline_batches = _PIPELINE_BATCHES.value
  if _QUICK.value:
    num_steps, repeats, ckpt_repeats, ckpt_shape, pipeline_batches = 300, 1, 2, (32, 32, 3), 100
  config = throughput_config(
    model=_MODEL.value, input_shape=input_shape, batch_size=_BATCH_SIZE.value, num_steps=num_steps
  )
  if _QUICK.value:
    config.checkpoint.every_steps = 100
  config.lock()

  tmp_root = tempfile.mkdtemp(prefix="trainer_overhead_", dir=_TMP_ROOT.value)
  wall_start = time.perf_counter()
  try:
    batches = host_batches(config)
    step_fns = minimal_train_step(config)
    variants = {
      "trainer": Variant(
        "trainer: train_and_evaluate (log/100, async ckpt/500)",
        lambda: run_trainer(config, tmp_root),
      ),
      "minimal": Variant(
        "minimal: jit loop, hand-written step",
        lambda: run_minimal(config, batches, step_fns),
      ),
      "minimal_trainer_step": Variant(
        "diagnostic: minimal loop, trainer's jitted step",
        lambda: run_minimal_trainer_step(config, batches),
      ),
      "trainer_batched_input": Variant(
        "diagnostic: trainer, batch-level input pipeline",
        lambda: run_trainer_batched_input(config, tmp_root),
      ),
    }
    rates = {name: [] for name in variants}
    for repeat in range(repeats):
      for name, variant in variants.items():
        gc.collect()
        rates[name].append(variant.run())
      print(
        f"repeat {repeat + 1}/{repeats}: "
        + ", ".join(f"{name} {values[-1]:.1f}" for name, values in rates.items())
        + " steps/s",
        flush=True,
      )
    pipelines = {
      "input_pipeline.train_iterator (as configured)": pipeline_batches_per_sec(
        input_pipeline.train_iterator, config, pipeline_batches
      ),
      "batch-level pipeline (diagnostic)": pipeline_batches_per_sec(
        batched_train_iterator, config, pipeline_batches
      ),
    }
    saves = [
      time_saves(
        f"{_MODEL.value} on {'x'.join(map(str, input_shape))} (part 1's model)",
        checkpoint_config(_MODEL.value, input_shape),
        ckpt_repeats,
        tmp_root,
      ),
      time_saves(
        f"mlp on {'x'.join(map(str, ckpt_shape))}",
        checkpoint_config("mlp", ckpt_shape),
        ckpt_repeats,
        tmp_root,
      ),
    ]
    profile = profile_trainer(config, tmp_root) if _PROFILE.value else None
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)

  print()
  print("command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]))
  print("\n".join(machine_description()))
  print()
  print(report_throughput(config, variants, rates, pipelines))
  print()
  print(report_saves(saves))
  if profile:
    print("\ncProfile of one trainer run (main thread, by own time):\n" + profile)
  print(f"\ntotal benchmark time: {time.perf_counter() - wall_start:.0f} s")


if __name__ == "__main__":
  app.run(main)
