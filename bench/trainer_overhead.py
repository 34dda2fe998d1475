r"""Trainer overhead vs a minimal jit loop, and how long a checkpoint save blocks the loop (issue 2).

  .venv/bin/python bench/trainer_overhead.py          # default: about 4 minutes on 2 CPU cores
  .venv/bin/python bench/trainer_overhead.py --quick  # sanity run, under a minute

Part 1 trains the same model on the same synthetic data four ways, in two setups:
  * tiny (`--tiny`, default the mlp on 16x16x3, about 2 ms a step on a CPU): mostly measures the
    fixed host work per step (Python, dispatch, input, metrics);
  * medium (`--medium`, default the cnn on 8x8x1 inputs, the model and shapes of `make run`,
    about 17 ms a step on a CPU): a step whose compute dominates, as on a real model.
The four variants, run once per repeat, interleaved so that drift in machine speed hits all alike:
  * trainer: `trainer.train.train_and_evaluate` as is (grain input pipeline, every step's loss
    and learning rate read back and logged every 100 steps with the gradient/parameter/update
    norms of the logging step,
    async checkpoints every 500 steps, one eval at the end); its `steps_per_sec` excludes the
    first (compiling) step and the eval; it gathers each batch on the device from the copy of
    the training arrays it made there (data.device_resident_mb);
  * trainer, host batches: the same with data.device_resident_mb=0, each batch gathered on the
    host and copied to the device (what the trainer did before, and does for larger data);
  * minimal: `jax.jit` of a hand-written step (same flax model, same optax optimizer, same loss)
    over batches pre-built as numpy arrays, `jax.device_put` each step, timed after one warmup
    step up to `block_until_ready`;
  * diagnostic: the minimal loop around the trainer's own jitted step
    (`build_experiment(...).loop_step`, the one it runs on steps it does not log, without the
    norms): what the step's extra metrics cost, and, against the trainer, what everything around
    the step costs.
It also times the trainer's input pipeline alone (no training), in batches/s.

Part 2 times `Checkpointer.save` with async_save on and off, on the state of the tiny setup's
model and on a larger one: how long the call blocks the training loop, and how long until the
checkpoint is complete.

Run on one CPU device (no --xla_force_host_platform_device_count). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import cProfile
import dataclasses
import gc
import io
import os
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

import models
from configs import base
from trainer import checkpointing, tasks, train
from trainer.data import load_dataset
from trainer.optimizers import create_optimizer

_QUICK = flags.DEFINE_bool("quick", False, "Sanity run: few steps, one repeat, a small state.")
_SETUPS = flags.DEFINE_list("setups", ["tiny", "medium"], "Part 1 setups to run, in order.")
_TINY = flags.DEFINE_string(
  "tiny",
  "mlp:16x16x3:1000",
  "The tiny-step setup as model:input shape:steps per run; the model is a classifier from "
  "models.MODELS without BatchNorm (mlp, mlp_tiny, cnn, cnn_tiny).",
)
_MEDIUM = flags.DEFINE_string(
  "medium", "cnn:8x8x1:500", "The medium-step setup, as model:input shape:steps per run."
)
_REPEATS = flags.DEFINE_integer("repeats", 6, "Interleaved runs of each variant (part 1).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch (part 1).")
_PIPELINE_BATCHES = flags.DEFINE_integer(
  "pipeline_batches", 1000, "Batches read when timing the input pipeline alone."
)
_CKPT_INPUT_SHAPE = flags.DEFINE_list(
  "ckpt_input_shape",
  ["128", "128", "3"],
  "Synthetic example shape for part 2; the mlp's first kernel is prod(shape) x 256.",
)
_CKPT_REPEATS = flags.DEFINE_integer("ckpt_repeats", 5, "Timed saves of each kind (part 2).")
_PROFILE = flags.DEFINE_bool(
  "profile", False, "Also run the first setup's trainer under cProfile and print its hot spots."
)
_TMP_ROOT = flags.DEFINE_string("tmp_root", None, "Where workdirs go (default: system temp).")

VARIANTS = {
  "trainer": "trainer: train_and_evaluate (log/100, async ckpt/500)",
  "trainer_host_batches": "trainer, each batch copied from the host (data.device_resident_mb=0)",
  "minimal": "minimal: jit loop, hand-written step",
  "minimal_trainer_step": "diagnostic: minimal loop, trainer's jitted step",
}


@dataclasses.dataclass(frozen=True)
class Setup:
  name: str
  config: ml_collections.ConfigDict

  @property
  def description(self) -> str:
    config = self.config
    shape = "x".join(map(str, config.data.synthetic_input_shape))
    return (
      f"{self.name}: model {config.model.name}, synthetic {shape} inputs, batch "
      f"{config.train.global_batch_size}, {config.train.num_steps} steps per run"
    )


@dataclasses.dataclass(frozen=True)
class SaveTiming:
  # How long `Checkpointer.save` blocked the caller.
  blocking_ms: float
  # Until `wait_until_finished` returned: the checkpoint is complete on disk.
  total_ms: float


def parse_setup(name: str, spec: str, batch_size: int) -> Setup:
  """`mlp:16x16x3:1000` -> the throughput config of that model, input shape and step count."""
  try:
    model, shape, steps = spec.split(":")
    input_shape = tuple(int(d) for d in shape.split("x"))
    num_steps = int(steps)
  except ValueError as e:
    raise app.UsageError(
      f"--{name}={spec!r}: expected model:HxWxC:steps, e.g. cnn:8x8x1:500"
    ) from e
  return Setup(name, throughput_config(model, input_shape, batch_size, num_steps))


def throughput_config(
  model: str, input_shape: tuple[int, ...], batch_size: int, num_steps: int
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


# --- Part 1 -------------------------------------------------------------------------------------


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
  model = models.get_model(config.model, num_outputs=dataset.spec.num_classes)
  tx = create_optimizer(config.optim, config.train.num_steps).tx

  def init(rng):
    dummy = jnp.zeros((1, *dataset.spec.input_shape), jnp.float32)
    params = nn.meta.unbox(model.init(rng, dummy, train=False)["params"])
    return params, tx.init(params)

  def step(carry, batch):
    params, opt_state = carry

    def loss_fn(params):
      inputs = tasks.normalize(batch["inputs"], dataset.spec.mean, dataset.spec.std)
      logits = model.apply({"params": params}, inputs, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(init), jax.jit(step, donate_argnums=(0,))


def variant_runners(setup: Setup, tmp_root: str) -> dict[str, Callable[[], float]]:
  """Each variant of part 1 as a function returning steps/s."""
  config = setup.config
  batches = host_batches(config)
  init, step = minimal_train_step(config)
  host_batches_config = copy.deepcopy(config)
  host_batches_config.data.device_resident_mb = 0

  def minimal_trainer_step() -> float:
    experiment = train.build_experiment(config)
    state = experiment.init_state(jax.random.PRNGKey(config.seed))
    return harness.time_loop(experiment.loop_step, state, batches, config.train.num_steps)

  return {
    "trainer": lambda: harness.run_trainer(config, tmp_root).steps_per_sec,
    "trainer_host_batches": lambda: (
      harness.run_trainer(host_batches_config, tmp_root).steps_per_sec
    ),
    "minimal": lambda: harness.time_loop(
      step, init(jax.random.PRNGKey(config.seed)), batches, config.train.num_steps
    ),
    "minimal_trainer_step": minimal_trainer_step,
  }


def pipeline_batches_per_sec(config: ml_collections.ConfigDict, num_batches: int) -> float:
  """How fast the trainer's input pipeline alone delivers device batches, after its first."""
  experiment = train.build_experiment(config)
  iterator = experiment.train_iterator()
  jax.block_until_ready(next(iterator))
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  jax.block_until_ready(batch)
  rate = num_batches / (time.perf_counter() - start)
  iterator.close()
  return rate


def profile_trainer(config: ml_collections.ConfigDict, tmp_root: str) -> str:
  """The main thread's hottest functions during one trainer run (cProfile, by own time)."""
  profiler = cProfile.Profile()
  profiler.enable()
  harness.run_trainer(config, tmp_root)
  profiler.disable()
  out = io.StringIO()
  pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
  return out.getvalue()


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
  data_iterator = experiment.train_iterator()
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


def report_setup(setup: Setup, rates: dict[str, list[float]], pipeline_rate: float) -> str:
  medians = {name: statistics.median(values) for name, values in rates.items()}

  def paired(name: str, reference: str) -> float:
    return statistics.median(v / r for v, r in zip(rates[name], rates[reference], strict=True))

  rows = [
    [
      VARIANTS[name],
      f"{medians[name]:.1f}",
      f"{1e3 / medians[name]:.2f}",
      f"{medians[name] / medians['minimal']:.3f}",
      f"{paired(name, 'minimal'):.3f}",
      ", ".join(f"{v:.0f}" for v in values),
    ]
    for name, values in rates.items()
  ]
  # Medians of per-run ratios: each run is paired with the other variants' runs of the same
  # repeat, so drift in machine speed between repeats cancels out.
  ratio = paired("trainer", "minimal")
  loop_ratio = paired("trainer", "minimal_trainer_step")
  step_ratio = paired("minimal_trainer_step", "minimal")
  device_ratio = paired("trainer", "trainer_host_batches")
  step_ms = 1e3 / medians["minimal"]
  return "\n".join(
    [
      f"Part 1, {setup.description}, {len(rates['minimal'])} interleaved runs of each; "
      "steps/s after the first (compiling) step",
      "",
      harness.table(
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
      f"{setup.name}, medians of per-run ratios: trainer / minimal = {ratio:.3f} "
      f"(target >= 0.97: {'met' if ratio >= 0.97 else 'NOT met'}); "
      f"trainer / minimal loop with the trainer's step = {loop_ratio:.3f} (the loop around the "
      f"step); trainer's step / hand-written step = {step_ratio:.3f} (the step's extra metrics); "
      f"batches gathered on the device / copied from the host = {device_ratio:.3f}",
      f"{setup.name}: the input pipeline alone delivers {pipeline_rate:.0f} batches/s "
      f"({1e3 / pipeline_rate:.2f} ms a batch, against {step_ms:.2f} ms a minimal step)",
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
      harness.table(
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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  harness.require_one_cpu_device()
  harness.quiet_logs()

  repeats, ckpt_repeats = _REPEATS.value, _CKPT_REPEATS.value
  ckpt_shape = tuple(int(d) for d in _CKPT_INPUT_SHAPE.value)
  pipeline_batches = _PIPELINE_BATCHES.value
  specs = {"tiny": _TINY.value, "medium": _MEDIUM.value}
  unknown = set(_SETUPS.value) - set(specs)
  if unknown:
    raise app.UsageError(f"unknown setups {sorted(unknown)}; choose from {sorted(specs)}")
  setups = [parse_setup(name, specs[name], _BATCH_SIZE.value) for name in _SETUPS.value]
  if _QUICK.value:
    repeats, ckpt_repeats, ckpt_shape, pipeline_batches = 1, 2, (32, 32, 3), 200
    for setup in setups:
      setup.config.train.num_steps = 300 if setup.name == "tiny" else 100
      setup.config.eval.every_steps = setup.config.train.num_steps
      setup.config.checkpoint.every_steps = 100
  for setup in setups:
    setup.config.lock()

  tmp_root = tempfile.mkdtemp(prefix="trainer_overhead_", dir=_TMP_ROOT.value)
  wall_start = time.perf_counter()
  load_before = harness.load_average()
  try:
    runners = {setup.name: variant_runners(setup, tmp_root) for setup in setups}
    rates = {setup.name: {name: [] for name in VARIANTS} for setup in setups}
    for repeat in range(repeats):
      for setup in setups:
        for name, run in runners[setup.name].items():
          gc.collect()
          rates[setup.name][name].append(run())
        print(
          f"repeat {repeat + 1}/{repeats}, {setup.name}: "
          + ", ".join(f"{name} {values[-1]:.1f}" for name, values in rates[setup.name].items())
          + f" steps/s (load {harness.load_average()})",
          flush=True,
        )
    pipelines = {
      setup.name: pipeline_batches_per_sec(setup.config, pipeline_batches) for setup in setups
    }
    model = setups[0].config.model.name
    shape = tuple(setups[0].config.data.synthetic_input_shape)
    saves = [
      time_saves(
        f"{model} on {'x'.join(map(str, shape))} ({setups[0].name} setup's model)",
        checkpoint_config(model, shape),
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
    profile = profile_trainer(setups[0].config, tmp_root) if _PROFILE.value else None
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)

  print()
  harness.print_run_header(load_before)
  for setup in setups:
    print()
    print(report_setup(setup, rates[setup.name], pipelines[setup.name]))
  print()
  print(report_saves(saves))
  if profile:
    print("\ncProfile of one trainer run (main thread, by own time):\n" + profile)
  print(f"\ntotal benchmark time: {time.perf_counter() - wall_start:.0f} s")


if __name__ == "__main__":
  app.run(main)
