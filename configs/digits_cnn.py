"""A small CNN on scikit-learn's bundled 8x8 handwritten digits (the `make run` default).

python -m trainer.main --config=configs/digits_cnn.py --workdir=/tmp/digits
python -m trainer.main --config=configs/digits_cnn.py:smoke --workdir=/tmp/smoke
"""

from configs import base


def get_config(arg: str | None = None):
  """`arg`: nothing, or `smoke` (cnn_tiny, 20 steps). Raises ConfigError for anything else."""
  args = base.parse_config_arg(arg, smoke=False)
  config = base.get_base_config()
  config.data.name = "digits"
  config.model.name = "cnn"
  config.model.dropout_rate = 0.1

  config.optim.name = "adamw"
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 1e-4

  # 1257 training images: 1500 steps of 128 is ~150 epochs, which a CPU does in well under a minute.
  config.train.num_steps = 1500
  config.train.global_batch_size = 128
  config.train.log_every_steps = 100
  config.eval.every_steps = 250
  config.checkpoint.every_steps = 500

  if args.smoke:
    base.shrink_for_smoke(config)
    config.model.name = "cnn_tiny"
  return config


def get_search_space(trial) -> dict:
  """Config overrides for one hyperparameter-search trial (`python -m mlops.hpo`); `trial` is
  an optuna.Trial. Parameter names are the config fields they set."""
  return {
    "optim.learning_rate": trial.suggest_float("optim.learning_rate", 3e-4, 3e-2, log=True),
    "optim.weight_decay": trial.suggest_float("optim.weight_decay", 1e-6, 1e-2, log=True),
    "model.dropout_rate": trial.suggest_float("model.dropout_rate", 0.0, 0.3),
  }
