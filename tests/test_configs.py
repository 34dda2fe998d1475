"""Config-file arguments: one convention (short or full model names, `smoke`, combined forms)
and a ConfigError naming the valid choices for anything else."""

import os
import subprocess
import sys

import pytest

from configs import digits_cnn, lm, resnet
from trainer.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "module, arg, model",
  [
    (resnet, "variant=tiny", "resnet_tiny"),
    (resnet, "variant=resnet_tiny", "resnet_tiny"),
    (resnet, "variant=18", "resnet18"),
    (resnet, "variant=resnet50", "resnet50"),
    (resnet, None, "resnet18"),
    (lm, "size=tiny", "lm_tiny"),
    (lm, "size=lm_tiny", "lm_tiny"),
    (lm, "size=1.3b", "lm_1.3b"),
    (lm, "size=lm_350m", "lm_350m"),
    (lm, None, "lm_tiny"),
  ],
)
def test_short_and_full_model_names_give_the_same_model(module, arg, model):
  assert module.get_config(arg).model.name == model


@pytest.mark.parametrize(
  "module, full, smoke",
  [
    (digits_cnn, None, "smoke"),
    (lm, "size=tiny", "size=tiny,smoke"),
    (lm, "size=tiny", "smoke,size=lm_tiny"),
    (resnet, "variant=tiny", "variant=tiny,smoke"),
    (resnet, "variant=18", "smoke"),
  ],
)
def test_smoke_shrinks_every_config_alone_or_combined(module, full, smoke):
  full_config, smoke_config = module.get_config(full), module.get_config(smoke)
  assert smoke_config.train.num_steps == 20 < full_config.train.num_steps
  assert module.get_config(smoke.replace("smoke", "smoke=false")).to_dict() == full_config.to_dict()


@pytest.mark.parametrize(
  "module, arg, message",
  [
    (resnet, "variant=huge", "unknown variant 'huge'; choose one of tiny (resnet_tiny), 18"),
    (lm, "size=2b", "unknown size '2b'; choose one of tiny (lm_tiny), 125m (lm_125m)"),
    (lm, "sise=tiny", "unknown config argument 'sise' in 'sise=tiny'; did you mean 'size'?"),
    (
      digits_cnn,
      "smok",
      "unknown config argument 'smok' in 'smok'; did you mean 'smoke'? valid arguments: ['smoke']",
    ),
    (resnet, "smoke=maybe", "config argument smoke='maybe' in 'smoke=maybe' must be true or false"),
  ],
)
def test_a_bad_argument_is_a_config_error_naming_the_choices(module, arg, message):
  with pytest.raises(ConfigError) as error:
    module.get_config(arg)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize(
  "config, message",
  [
    (
      "configs/resnet.py:variant=huge",
      "unknown variant 'huge'; choose one of tiny (resnet_tiny), 18 (resnet18), 50 (resnet50)",
    ),
    ("configs/lm.py:size=tiny,smoke=maybe", "config argument smoke='maybe'"),
  ],
)
def test_trainer_main_prints_a_bad_argument_as_one_line(config, message, tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "trainer.main", f"--config={config}", f"--workdir={tmp_path / 'run'}"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )
  assert proc.returncode == 1
  assert proc.stderr.startswith(f"error: --config={config}: ") and message in proc.stderr
  assert proc.stderr.count("\n") == 1
  assert not (tmp_path / "run").exists()
