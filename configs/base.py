"""The base config every experiment family derives from.

Each field a user may set lives here with its default, grouped by concern, so that
`--config.<group>.<field>=...` overrides are checked against one schema and a misspelled key
fails at the command line.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

from trainer.errors import ConfigError

# Logical parameter/activation axis names -> mesh axes. `batch` is split over both data-parallel
# axes (`data` replicates parameters, `fsdp` shards them); `tensor` splits hidden widths.
# Rules apply in order; a mesh axis is used at most once per array, so activations whose batch
# already takes `fsdp` keep their `embed` dimension whole.
DEFAULT_LOGICAL_AXIS_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("vocab", "tensor"),
  ("kv", None),
  ("length", None),
  ("conv_in", None),
  ("conv_out", "tensor"),
  ("classes", None),
)


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seeds parameter init, data order and per-step randomness (dropout).
  config.seed = 0
  # What this run is for, in a sentence or two: the "Objective" of its experiment report.
  config.description = ""

  config.data = ml_collections.ConfigDict()
  # digits | synthetic | npz | array_record (classification), text (language models)
  config.data.name = "digits"
  # npz / array_record: a file path or glob for each split. eval_path is the validation split
  # (best checkpoint, early stopping); test_path (optional) the held-out test split.
  config.data.train_path = ""
  config.data.eval_path = ""
  config.data.test_path = ""
  # npz: array names inside the file.
  config.data.inputs_key = "inputs"
  config.data.labels_key = "labels"
  # array_record (required) and npz (inferred when 0): number of label classes.
  config.data.num_classes = 0
  # Inputs are normalized as (x - mean) / std inside the jitted step (and, later, the export).
  # Unset means the dataset's own default (digits: 0 / 16, others: 0 / 1).
  config.data.mean = config_dict.placeholder(float)
  config.data.std = config_dict.placeholder(float)
  # digits: the 70/15/15 train/validation/test split is fixed by this seed, independent of
  # `config.seed` (synthetic: the data itself).
  config.data.split_seed = 0
  # synthetic: example shape, classes and split sizes.
  config.data.synthetic_input_shape = (8, 8, 1)
  config.data.synthetic_num_classes = 10
  config.data.synthetic_train_examples = 4096
  config.data.synthetic_eval_examples = 512
  # text (language models): a path or glob of text files or ArrayRecord files of token ids;
  # empty means the Python standard library's source files.
  config.data.files = ""
  # text: tokens per packed row, bytes to read at most (0: all), and every how many documents
  # one is held out for eval.
  config.data.seq_len = 256
  config.data.max_bytes = 0
  config.data.eval_every_documents = 50
  config.data.shuffle = True
  # Host threads that read and batch, and how many batches they keep ready.
  config.data.worker_threads = 2
  config.data.prefetch_batches = 4
  # In-memory training arrays (digits, synthetic, npz) of at most this many MiB are copied to
  # every device once and each batch is gathered there (no host copy per step); 0: never.
  config.data.device_resident_mb = 256

  config.model = ml_collections.ConfigDict()
  # A name from models.MODELS, e.g. cnn, cnn_tiny, mlp, mlp_tiny.
  config.model.name = "cnn"
  # Compute dtype (float32 | bfloat16); parameters are always float32.
  config.model.dtype = "float32"
  config.model.dropout_rate = 0.0
  # Rematerialization of transformer blocks: none | full | dots_saveable.
  config.model.remat = "none"

  config.optim = ml_collections.ConfigDict()
  # adamw | adam | sgd | lamb
  config.optim.name = "adamw"
  config.optim.learning_rate = 1e-3
  # cosine | linear | constant, each after a linear warmup from 0.
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 0
  # The schedule decays to learning_rate * end_lr_factor.
  config.optim.end_lr_factor = 0.0
  # Decoupled weight decay, applied to kernels only (never to biases or norm scales).
  config.optim.weight_decay = 0.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  # sgd only.
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  # Clip the global gradient norm to this value; 0 disables clipping.
  config.optim.grad_clip_norm = 1.0
  # Each step splits the global batch into this many micro-batches and sums their gradients.
  config.optim.grad_accum_steps = 1
  # Exponential moving average of the parameters, used for eval when > 0.
  config.optim.ema_decay = 0.0

  config.mesh = ml_collections.ConfigDict()
  # Mesh axis sizes; one of them may be -1 to take the remaining devices.
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 1000
  # Global batch over all processes; must divide by the data-parallel size (data * fsdp).
  config.train.global_batch_size = 128
  config.train.log_every_steps = 100
  # Watchdog (trainer/watchdog.py): when no step completes for stall_timeout_s, every process
  # logs its stage and thread stacks and exits with status 3. 0 means max(stall_floor_s, 100 x
  # the measured step time); the floor also covers compilation, evals and checkpoints.
  config.train.stall_timeout_s = 0.0
  config.train.stall_floor_s = 600.0

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 200
  # Global eval batch; the last batch is padded and masked, so every example counts once.
  config.eval.global_batch_size = 128
  # Evaluate on at most this many batches (the same ones every time); 0 means the whole split.
  config.eval.max_batches = 0
  # The metric that picks the best checkpoints and drives early stopping.
  config.eval.best_metric = "accuracy"
  # max | min
  config.eval.best_mode = "max"
  # Stop after this many evals without improvement of best_metric by min_delta; 0 disables.
  config.eval.early_stopping_patience = 0
  config.eval.early_stopping_min_delta = 0.0

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.enabled = True
  config.checkpoint.every_steps = 500
  # Keep the newest keep_last checkpoints plus the keep_best best by eval.best_metric.
  config.checkpoint.keep_last = 2
  config.checkpoint.keep_best = 1
  # Save in a background thread; the loop only waits for the device-to-host copy.
  config.checkpoint.async_save = True
  config.perf = ml_collections.ConfigDict()
  # Peak dense TFLOP/s of one device for perf/mfu; 0 looks the device up in trainer/perf.py
  # (known GPUs and TPUs). Set it for anything else, e.g. a CPU.
  config.perf.peak_tflops = 0.0

  # MLflow tracking (trainer/tracking.py); a store that fails never stops training.
  config.tracking = ml_collections.ConfigDict()
  config.tracking.enabled = True
  # Tracking URI; empty means sqlite:///<project root>/mlflow.db. MLFLOW_TRACKING_URI wins.
  config.tracking.uri = ""
  # MLFLOW_EXPERIMENT_NAME wins.
  config.tracking.experiment = "jax-trainer"
  # Artifact root of a new experiment; empty: next to a SQLite store, else MLflow's default.
  config.tracking.artifact_location = ""
  # How long the end of training waits for unsent records before reporting them as not logged.
  config.tracking.flush_timeout_s = 60.0
  # Seconds between metric uploads: the metrics logged in between go in one log_batch call,
  # which costs about the same for 10 metrics as for 100. The first ones go at once.
  config.tracking.metrics_every_s = 5.0
  # Write the experiment report (python -m mlops.report) at the end and log it as an artifact.
  config.tracking.report = True

  # Free text for the model card (mlops/model_card.py); empty prints "not provided".
  config.card = ml_collections.ConfigDict()
  config.card.intended_use = ""
  config.card.out_of_scope_use = ""
  config.card.ethical_considerations = ""
  return config


_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")


def parse_config_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config-file argument such as `smoke` or `size=tiny,smoke` (the part of
  `--config=FILE:ARG` after the colon) into a ConfigDict of `defaults`' keys.

  Called by each config's `get_config`. Bare words set a key to True; `key=value` sets it to the
  string `value`, or for a key whose default is a bool, to true/false (`smoke=false`). Raises
  ConfigError for a key that is not one of `defaults` and for a bool that is neither.
  """
  values = dict(defaults)
  for token in filter(None, (arg or "").split(",")):
    key, sep, value = token.partition("=")
    key, value = key.strip(), value.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise ConfigError(
        f"unknown config argument {key!r} in {arg!r}; {hint}valid arguments: {sorted(defaults)}"
      )
    if isinstance(defaults[key], bool) and sep:
      if value.lower() not in _TRUE_WORDS + _FALSE_WORDS:
        raise ConfigError(f"config argument {key}={value!r} in {arg!r} must be true or false")
      values[key] = value.lower() in _TRUE_WORDS
    else:
      values[key] = value if sep else True
  return ml_collections.ConfigDict(values)


def model_name(key: str, value: str, names: Sequence[str], prefix: str) -> str:
  """The model `value` names: one of `names` (`resnet_tiny`, `lm_125m`), or one of them without
  `prefix` and its underscore (`tiny`, `125m`), the short form every config argument accepts.

  Called by configs' `get_config` for their size/variant argument; raises ConfigError naming
  both forms of every valid choice.
  """
  short = {name.removeprefix(prefix).removeprefix("_"): name for name in names}
  if value in names:
    return value
  if value in short:
    return short[value]
  choices = ", ".join(f"{s} ({name})" for s, name in short.items())
  raise ConfigError(f"unknown {key} {value!r}; choose one of {choices}")


def shrink_for_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks any config in place so that a run takes seconds on one CPU core."""
  config.train.num_steps = 20
  config.train.global_batch_size = 32
  config.train.log_every_steps = 5
  config.eval.every_steps = 10
  config.eval.global_batch_size = 64
  config.checkpoint.every_steps = 10
  config.optim.warmup_steps = min(config.optim.warmup_steps, 2)
  config.data.worker_threads = 1
  config.data.prefetch_batches = 2
