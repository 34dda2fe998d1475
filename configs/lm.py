"""A GPT-style language model on byte-level text (by default, the Python standard library).

  python -m trainer.main --config=configs/lm.py:size=tiny --workdir=/tmp/lm
  python -m trainer.main --config=configs/lm.py:size=tiny,smoke --workdir=/tmp/lm_smoke
  python -m trainer.main --config=configs/lm.py:size=350m --workdir=/runs/lm350m \\
      --config.mesh.fsdp=-1 --config.mesh.tensor=2 --config.data.files='/data/*.txt'
"""

from configs import base

# size -> (seq_len, global batch, peak learning rate). Learning rates from GPT-3 Table 2.1.
SIZES = {
  "tiny": (128, 16, 3e-3),
  "125m": (1024, 32, 6e-4),
  "350m": (1024, 32, 3e-4),
  "760m": (1024, 32, 2.5e-4),
  "1.3b": (1024, 32, 2e-4),
}


def get_config(arg: str | None = None):
  """`arg`: `size=S` (tiny, 125m, 350m, 760m, 1.3b, or the model name lm_S), `smoke`, or both
  (`size=tiny,smoke`). Raises ConfigError for anything else."""
  args = base.parse_config_arg(arg, size="tiny", smoke=False)
  model = base.model_name("size", args.size, [f"lm_{size}" for size in SIZES], "lm")
  size = model.removeprefix("lm_")
  seq_len, batch, learning_rate = SIZES[size]
  config = base.get_base_config()
  config.data.name = "text"
  config.data.seq_len = seq_len
  config.model.name = model
  # Large models compute in bfloat16 (parameters stay float32); tiny stays float32 for CPU tests.
  config.model.dtype = "float32" if size == "tiny" else "bfloat16"

  config.optim.name = "adamw"
  config.optim.learning_rate = learning_rate
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.1
  config.optim.warmup_steps = 100
  config.optim.end_lr_factor = 0.1

  config.train.num_steps = 2000
  config.train.global_batch_size = batch
  config.train.log_every_steps = 50
  config.eval.every_steps = 500
  config.eval.global_batch_size = batch
  config.eval.max_batches = 20
  config.eval.best_metric = "loss"
  config.eval.best_mode = "min"
  config.checkpoint.every_steps = 500

  if args.smoke:
    base.shrink_for_smoke(config)
    config.data.seq_len = 32
    config.data.max_bytes = 300_000
    # 300 kB is 13 documents: hold out every 4th so validation and test both get some.
    config.data.eval_every_documents = 4
    config.eval.global_batch_size = 32
    config.eval.max_batches = 2
  return config


def get_search_space(trial) -> dict:
  """Config overrides for one hyperparameter-search trial (`python -m mlops.hpo`); `trial` is
  an optuna.Trial. Parameter names are the config fields they set."""
  return {
    "optim.learning_rate": trial.suggest_float("optim.learning_rate", 1e-4, 1e-2, log=True),
    "optim.warmup_steps": trial.suggest_int("optim.warmup_steps", 0, 200, step=50),
    "optim.weight_decay": trial.suggest_float("optim.weight_decay", 0.0, 0.2),
  }
