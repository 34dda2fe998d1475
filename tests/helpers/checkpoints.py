"""Reading back what a training run checkpointed."""

import jax

from trainer import checkpointing, train


def restore_latest(config, workdir, devices=None):
  """(step, state on the host, data-iterator state) of the latest checkpoint in `workdir`."""
  experiment = train.build_experiment(config, devices)
  checkpointer = checkpointing.Checkpointer(
    str(workdir), config.checkpoint, best_metric="eval/accuracy", best_mode="max"
  )
  iterator = experiment.train_iterator(worker_threads=0, prefetch_batches=1)
  step = checkpointer.latest_step()
  state, _ = checkpointer.restore(step, experiment.abstract_state, iterator)
  checkpointer.close()
  return step, jax.device_get(state), iterator.get_state()
