"""ResNets on synthetic CIFAR-sized images.

python -m trainer.main --config=configs/resnet.py:variant=18 --workdir=/tmp/rn
python -m trainer.main --config=configs/resnet.py:variant=tiny,smoke --workdir=/tmp/rn_smoke
"""

from configs import base

VARIANTS = ("resnet_tiny", "resnet18", "resnet50")


def get_config(arg: str | None = None):
  """`arg`: `variant=V` (tiny, 18, 50, or the model name resnet_tiny, resnet18, resnet50),
  `smoke` (resnet_tiny on 8x8 images), or both. Raises ConfigError for anything else."""
  args = base.parse_config_arg(arg, variant="resnet18", smoke=False)
  variant = base.model_name("variant", args.variant, VARIANTS, "resnet")
  config = base.get_base_config()
  config.data.name = "synthetic"
  config.data.synthetic_input_shape = (32, 32, 3)
  config.data.synthetic_num_classes = 10
  config.data.synthetic_train_examples = 8192
  config.data.synthetic_eval_examples = 1024
  config.model.name = variant

  config.optim.name = "sgd"
  config.optim.learning_rate = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.warmup_steps = 100

  config.train.num_steps = 2000
  config.train.global_batch_size = 128
  config.eval.every_steps = 500
  config.checkpoint.every_steps = 500

  if args.smoke:
    base.shrink_for_smoke(config)
    config.model.name = "resnet_tiny"
    config.data.synthetic_input_shape = (8, 8, 3)
    config.data.synthetic_train_examples = 256
    config.data.synthetic_eval_examples = 64
  return config
