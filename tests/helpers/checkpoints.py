"""Reading back what a training run checkpointed."""

import jax

from trainer import checkpointing, input_pipeline, train


def restore_latest(config, workdir, devices=None):
  """(step, state on the host, data-iterator state) of the latest checkpoint in `workdir`."""
  experiment = train.build_experiment(config, devices)
  checkpointer = checkpointing.Checkpointer(
    str(workdir), config.checkpoint, best_metric="eval/accuracy", best_mode="max"
  )
  iterator = input_pipeline.train_iterator(
    experiment.dataset,
    global_batch_size=config.train.global_batch_size,
    seed=config.seed,
    shuffle=config.data.shuffle,
    worker_threads=0,
    prefetch_batches=1,
    sharding=experiment.batch_sharding,
  )
  step = checkpointer.latest_step()
  state, _ = checkpointer.restore(step, experiment.abstract_state, iterator)
  checkpointer.close()
  return step, jax.device_get(state), iterator.get_state()
