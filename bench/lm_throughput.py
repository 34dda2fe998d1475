r"""Language-model tokens/s against a minimal jit loop; compile time and memory per configuration.

  .venv/bin/python bench/lm_throughput.py          # default: about 4 minutes on 2 CPU cores
  .venv/bin/python bench/lm_throughput.py --quick  # sanity run, about a minute

Part 1 (issue 3): tokens/s of `train.train_and_evaluate` on `configs/lm.py:size=tiny` (byte-level
text from the standard library, `data.max_bytes` of it, sequences of 128, batch 16; the config's
own logging every 50 steps and checkpointing, one eval at the end, excluded from its rate)
against a minimal hand-written loop of the same model (`models.get_model`), the same optax
optimizer (`create_optimizer`) and the same loss (`tasks.LanguageModelTask`), over the trainer's
own first batches pre-built as numpy arrays and `jax.device_put` each step. The two run in turns,
`--repeats` times each; the ratio of the medians is printed.

Part 2: for each configuration (the tiny LM and a 4-layer d_model 256 LM, each with remat none,
full and dots_saveable; `--with_125m` adds GPT-3 125m at the same sequence length and batch), in a
fresh subprocess so that its peak memory is its own: the time to lower and compile the trainer's
jitted train step (`experiment.train_step.lower(...).compile()`), XLA's memory analysis of the
compiled step (arguments, outputs, temporaries), the process's peak RSS, and the step time of the
compiled step over a few steps.

Runs on one CPU device; no GPU number (MFU) comes out of it. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import flax.linen as nn
import harness
import jax
import ml_collections
import optax
from absl import app, flags

import models
from configs import lm
from models import transformer
from trainer import tasks, train
from trainer.data import Dataset, load_dataset
from trainer.data import pipeline as input_pipeline
from trainer.optimizers import create_optimizer

_QUICK = flags.DEFINE_bool("quick", False, "Sanity run: fewer steps, one repeat, two configs.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 200, "Train steps per run (part 1).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Runs of the trainer and of the minimal loop.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 2_000_000, "Bytes of text read (data.max_bytes).")
_CONFIGS = flags.DEFINE_list(
  "configs",
  [
    "lm_tiny/none",
    "lm_tiny/full",
    "lm_tiny/dots_saveable",
    "lm_256x4/none",
    "lm_256x4/full",
    "lm_256x4/dots_saveable",
  ],
  "Part 2 configurations as model/remat; models are lm_tiny, lm_256x4, lm_125m.",
)
_WITH_125M = flags.DEFINE_bool(
  "with_125m", False, "Add lm_125m/none and lm_125m/full to part 2 (about 20 s of CPU per step)."
)
_TIMED_STEPS = flags.DEFINE_integer(
  "timed_steps", 3, "Steps timed per configuration in part 2, after a first one."
)
_TMP_ROOT = flags.DEFINE_string("tmp_root", None, "Where workdirs go (default: system temp).")
# Internal: run one part 2 configuration in this process and print its result as JSON.
_CHILD = flags.DEFINE_string("child", None, "(internal) measure one model/remat configuration.")

# Models that are not in models.MODELS, registered inside this process only.
# 4 layers, d_model 256, 4 heads of 64, SwiGLU MLP of 768 (8/3 d_model): a 3.3M-parameter LM
# whose step takes about a second on a 2-core CPU.
EXTRA_MODELS = {
  "lm_256x4": functools.partial(
    transformer.TransformerLM,
    num_layers=4,
    d_model=256,
    num_heads=4,
    num_kv_heads=4,
    head_dim=64,
    mlp_dim=768,
  ),
}


def lm_config(
  model: str, *, remat: str, max_bytes: int, num_steps: int
) -> ml_collections.ConfigDict:
  """`configs/lm.py:size=tiny` (sequences of 128, batch 16) with `model` and `remat`, in float32."""
  config = lm.get_config("size=tiny")
  config.model.name = model
  config.model.remat = remat
  # CPUs have no fast bfloat16 matmuls; lm.py picks bfloat16 for the registry's large sizes.
  config.model.dtype = "float32"
  config.data.max_bytes = max_bytes
  config.train.num_steps = num_steps
  config.optim.warmup_steps = min(config.optim.warmup_steps, num_steps)
  # Eval once, at the end (excluded from the trainer's rate).
  config.eval.every_steps = num_steps
  return config


def registered(model: str):
  """A context in which `models.get_model` also knows EXTRA_MODELS."""
  extra = {name: models._language_model(factory) for name, factory in EXTRA_MODELS.items()}
  return mock.patch.dict(models.MODELS, extra if model in extra else {})


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  return config.train.global_batch_size * config.data.seq_len


# --- Part 1 -------------------------------------------------------------------------------------


def first_batches(config: ml_collections.ConfigDict, dataset: Dataset, count: int) -> list[dict]:
  """The trainer's first `count` batches (same seed, same order) as numpy arrays."""
  stream = input_pipeline.GlobalStreamBatches(
    dataset.train,
    global_batch_size=config.train.global_batch_size,
    seed=config.seed,
    shuffle=config.data.shuffle,
    process_index=0,
    process_count=1,
  )
  return [stream[k] for k in range(count)]


def minimal_lm_step(
  config: ml_collections.ConfigDict, dataset: Dataset
) -> tuple[Callable, Callable]:
  """`(init(rng) -> carry, step(carry, batch) -> (carry, loss))`, jitted, nothing else."""
  model = models.get_model(config.model, num_outputs=dataset.spec.num_classes)
  tx = create_optimizer(config.optim, config.train.num_steps).tx
  task = tasks.LanguageModelTask(dataset.spec)

  def init(rng):
    args, kwargs = task.model_inputs(task.init_batch())
    params = nn.meta.unbox(model.init(rng, *args, train=False, **kwargs)["params"])
    return params, tx.init(params)

  def step(carry, batch):
    params, opt_state = carry

    def loss_fn(params):
      args, kwargs = task.model_inputs(batch)
      logits = model.apply({"params": params}, *args, train=True, **kwargs)
      sums = task.sums(logits, batch)
      return sums["loss"] / sums["weight"]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(init), jax.jit(step, donate_argnums=(0,))


def measure_throughput(
  config: ml_collections.ConfigDict, repeats: int, tmp_root: str
) -> dict[str, list[float]]:
  """Tokens/s of the trainer and of the minimal loop, `repeats` runs each, in turns."""
  dataset = load_dataset(config.data)
  batches = first_batches(config, dataset, config.train.num_steps)
  init, step = minimal_lm_step(config, dataset)
  runs = {
    "trainer": lambda: harness.run_trainer(config, tmp_root).steps_per_sec,
    "minimal": lambda: harness.time_loop(
      step, init(jax.random.PRNGKey(config.seed)), batches, config.train.num_steps
    ),
  }
  tokens = {name: [] for name in runs}
  for repeat in range(repeats):
    for name, run in runs.items():
      gc.collect()
      tokens[name].append(run() * tokens_per_step(config))
    print(
      f"repeat {repeat + 1}/{repeats}: "
      + ", ".join(f"{name} {values[-1]:.0f}" for name, values in tokens.items())
      + f" tokens/s (load {harness.load_average()})",
      flush=True,
    )
  return tokens


# --- Part 2 -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileResult:
  label: str
  num_params: int
  lower_s: float
  compile_s: float
  # XLA's memory analysis of the compiled train step, in bytes.
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  # Resident memory of the process before lowering (data and parameters loaded, nothing
  # compiled), and its peak by the end (after the steps).
  rss_before_bytes: int
  rss_peak_bytes: int
  step_ms: float
  tokens_per_step: int
  flops_per_step: float | None


def _rss_bytes() -> int:
  """Resident memory now (Linux)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def measure_compile(label: str, max_bytes: int, timed_steps: int) -> CompileResult:
  """Compiles the trainer's train step for `label` (model/remat) and runs it a few times."""
  model, remat = label.split("/")
  config = lm_config(model, remat=remat, max_bytes=max_bytes, num_steps=1000)
  with registered(model):
    experiment = train.build_experiment(config)
  batch = jax.device_put(first_batches(config, experiment.dataset, 1)[0], experiment.batch_sharding)
  rss_before = _rss_bytes()
  start = time.perf_counter()
  lowered = experiment.train_step.lower(experiment.abstract_state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  memory = compiled.memory_analysis()
  state = experiment.init_state(jax.random.PRNGKey(config.seed))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  state, metrics = compiled(state, batch)  # Warms up; not timed.
  jax.block_until_ready(metrics)
  start_steps = time.perf_counter()
  for _ in range(timed_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_ms = 1e3 * (time.perf_counter() - start_steps) / timed_steps
  return CompileResult(
    label=label,
    num_params=num_params,
    lower_s=lowered_at - start,
    compile_s=compiled_at - lowered_at,
    argument_bytes=memory.argument_size_in_bytes,
    output_bytes=memory.output_size_in_bytes,
    temp_bytes=memory.temp_size_in_bytes,
    alias_bytes=memory.alias_size_in_bytes,
    rss_before_bytes=rss_before,
    rss_peak_bytes=_max_rss_bytes(),
    step_ms=step_ms,
    tokens_per_step=tokens_per_step(config),
    flops_per_step=experiment.flops_per_step,
  )


def measure_compile_in_subprocess(label: str, max_bytes: int, timed_steps: int) -> CompileResult:
  """`measure_compile` in a fresh Python process, so that peak RSS belongs to `label` alone."""
  command = [
    sys.executable,
    os.path.abspath(__file__),
    f"--child={label}",
    f"--max_bytes={max_bytes}",
    f"--timed_steps={timed_steps}",
  ]
  proc = subprocess.run(command, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{label}: the measuring process failed:\n{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return CompileResult(**result)


# --- Reporting ----------------------------------------------------------------------------------


def report_throughput(config: ml_collections.ConfigDict, tokens: dict[str, list[float]]) -> str:
  medians = {name: statistics.median(values) for name, values in tokens.items()}
  paired = statistics.median(
    t / m for t, m in zip(tokens["trainer"], tokens["minimal"], strict=True)
  )
  rows = [
    [
      name,
      f"{medians[name]:.0f}",
      f"{1e3 * tokens_per_step(config) / medians[name]:.1f}",
      f"{medians[name] / medians['minimal']:.3f}",
      ", ".join(f"{v:.0f}" for v in values),
    ]
    for name, values in tokens.items()
  ]
  ratio = medians["trainer"] / medians["minimal"]
  return "\n".join(
    [
      f"Part 1: {config.model.name} (remat {config.model.remat}, {config.model.dtype}), "
      f"seq_len {config.data.seq_len}, batch {config.train.global_batch_size} "
      f"({tokens_per_step(config)} tokens a step), {config.train.num_steps} steps per run, "
      f"{len(tokens['minimal'])} runs of each; tokens/s after the first (compiling) step",
      "",
      harness.table(
        ["variant", "median tokens/s", "ms/step", "median / minimal's", "runs (tokens/s)"], rows
      ),
      "",
      f"trainer / minimal = {paired:.3f} (median of per-run ratios, each trainer run paired with "
      f"the minimal run after it; ratio of medians {ratio:.3f}; "
      f"target >= 0.97: {'met' if paired >= 0.97 else 'NOT met'})",
    ]
  )


def report_compile(results: list[CompileResult]) -> str:
  mib = 2**20
  rows = []
  for r in results:
    peak = r.argument_bytes + r.output_bytes + r.temp_bytes - r.alias_bytes
    gflops = f"{r.flops_per_step / r.step_ms / 1e6:.1f}" if r.flops_per_step else "n/a"
    rows.append(
      [
        r.label,
        f"{r.num_params / 1e6:.2f}M",
        f"{r.lower_s:.2f}",
        f"{r.compile_s:.2f}",
        f"{r.argument_bytes / mib:.1f}",
        f"{r.output_bytes / mib:.1f}",
        f"{r.temp_bytes / mib:.1f}",
        f"{peak / mib:.1f}",
        f"{r.rss_before_bytes / mib:.0f} / {r.rss_peak_bytes / mib:.0f}",
        f"{r.step_ms:.0f}",
        f"{1e3 * r.tokens_per_step / r.step_ms:.0f}",
        gflops,
      ]
    )
  return "\n".join(
    [
      "Part 2: the trainer's train step per configuration (seq_len 128, batch 16, float32), each "
      "in its own process; memory in MiB from the compiled step's memory_analysis()",
      "",
      harness.table(
        [
          "model/remat",
          "params",
          "lower (s)",
          "compile (s)",
          "arguments",
          "outputs",
          "temporaries",
          "args + outputs + temps - aliased",
          "process RSS before compile / peak (MiB)",
          "step (ms)",
          "tokens/s",
          "model GFLOP/s",
        ],
        rows,
      ),
    ]
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  harness.require_one_cpu_device()
  harness.quiet_logs()
  if _CHILD.value:
    result = measure_compile(_CHILD.value, _MAX_BYTES.value, _TIMED_STEPS.value)
    print(json.dumps(dataclasses.asdict(result)))
    return

  num_steps, repeats, labels = _NUM_STEPS.value, _REPEATS.value, list(_CONFIGS.value)
  if _WITH_125M.value:
    labels += ["lm_125m/none", "lm_125m/full"]
  if _QUICK.value:
    num_steps, repeats, labels = 50, 1, ["lm_tiny/none", "lm_256x4/none"]
  for label in labels:
    model, _, remat = label.partition("/")
    if model not in (*models.MODELS, *EXTRA_MODELS) or remat not in transformer.REMAT_POLICIES:
      raise app.UsageError(f"--configs: {label!r} is not model/remat, e.g. lm_tiny/full")
  config = lm_config("lm_tiny", remat="none", max_bytes=_MAX_BYTES.value, num_steps=num_steps)
  config.lock()

  tmp_root = tempfile.mkdtemp(prefix="lm_throughput_", dir=_TMP_ROOT.value)
  wall_start = time.perf_counter()
  load_before = harness.load_average()
  try:
    tokens = measure_throughput(config, repeats, tmp_root)
    compiles = []
    for label in labels:
      compiles.append(measure_compile_in_subprocess(label, _MAX_BYTES.value, _TIMED_STEPS.value))
      print(
        f"{label}: compile {compiles[-1].compile_s:.1f} s, step {compiles[-1].step_ms:.0f} ms",
        flush=True,
      )
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)

  print()
  harness.print_run_header(load_before)
  print()
  print(report_throughput(config, tokens))
  print()
  print(report_compile(compiles))
  print(f"\ntotal benchmark time: {time.perf_counter() - wall_start:.0f} s")


if __name__ == "__main__":
  app.run(main)
