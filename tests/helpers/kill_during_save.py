"""Trains the digits smoke config and SIGKILLs itself in the middle of the save at --kill_step.

Used by test_resume.py to prove that a run killed mid-checkpoint resumes from the last complete
one. Config overrides arrive as JSON: `--overrides='{"train.num_steps": 12}'`.
"""

import json
import os
import signal
import sys

from absl import app, flags

from tests.helpers.configs import smoke_config
from trainer import checkpointing, train

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_KILL_STEP = flags.DEFINE_integer(
  "kill_step", None, "Step whose save is interrupted.", required=True
)
_OVERRIDES = flags.DEFINE_string("overrides", "{}", "JSON {dotted.key: value} config overrides.")


def main(argv):
  del argv
  original_save = checkpointing.Checkpointer.save

  def save_then_die(self, state, *args, **kwargs):
    original_save(self, state, *args, **kwargs)
    if int(state.step) == _KILL_STEP.value:
      # The async save has copied the arrays and is writing them: die right now.
      print(f"killing myself during the save of step {_KILL_STEP.value}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)

  checkpointing.Checkpointer.save = save_then_die
  train.train_and_evaluate(smoke_config(json.loads(_OVERRIDES.value)), _WORKDIR.value)
  sys.exit("the run finished without reaching the kill step")


if __name__ == "__main__":
  app.run(main)
