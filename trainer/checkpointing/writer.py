"""Writing checkpoints during training: `Checkpointer` saves and restores the train state, the
data iterator's position and the loop's own state; `check_compatible` explains a checkpoint a
config cannot restore."""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization

from trainer.checkpointing.layout import best_tracking, checkpoint_dir, open_manager
from trainer.data.dataset import DataSpec
from trainer.errors import ConfigError
from trainer.train_state import TrainState

# Config sections whose differences explain a shape mismatch, in the order worth reading.
_EXPLAINING_SECTIONS = ("model", "data")


class Checkpointer:
  """Saves and restores `TrainState` + data iterator + config.

  Every process must construct it and call `save`/`restore`/`wait_until_finished` together:
  Orbax coordinates the processes and writes each array shard from the process that owns it.
  """

  def __init__(
    self,
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    best_metric: str,
    best_mode: str,
    data_spec: DataSpec | None = None,
  ):
    # Saved with every step, so inference (export) needs the checkpoint alone, not the data.
    self.data_spec = data_spec.to_json() if data_spec else {}
    policies = [ocp.checkpoint_managers.LatestN(n=config.keep_last)]
    if config.keep_best > 0:
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric],
          reverse=best_mode == "min",
          n=config.keep_best,
          keep_checkpoints_without_metrics=False,
        )
      )
    self._tracks_best = config.keep_best > 0
    # Metrics are recorded (and best_step tracked) only when keeping the best; otherwise Orbax
    # would warn at every save that no metrics came with it.
    tracking = best_tracking(best_metric, best_mode, config.keep_best)
    self._manager = open_manager(
      checkpoint_dir(workdir),
      read_only=False,
      async_save=config.async_save,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      **tracking,
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best step by the tracked metric; None when not keeping the best (Orbax would answer
    the latest step then) or no step carries metrics yet."""
    return self._manager.best_step() if self._tracks_best else None

  def save(
    self,
    state: TrainState,
    data_iterator: grain.DatasetIterator,
    config: ml_collections.ConfigDict,
    metrics: dict[str, float] | None = None,
    loop_state: dict | None = None,
  ) -> None:
    """Starts saving at `state.step`; returns once the arrays are copied off the device.

    Every process must call it at the same step (Orbax writes each process's shards and
    synchronizes them); the caller has checked the state is finite. With async saving the
    write finishes in the background: call `wait_until_finished` (or `close`) before reading
    the step back. `metrics` (the eval metrics of this step) rank it for keep_best.
    """
    step = int(jax.device_get(state.step))
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(serialization.to_state_dict(state)),
        data_iter=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        loop_state=ocp.args.JsonSave(loop_state or {}),
        data_spec=ocp.args.JsonSave(self.data_spec),
      ),
      metrics=metrics,
      force=True,
    )

  def restore(
    self,
    step: int,
    abstract_state: TrainState,
    data_iterator: grain.DatasetIterator,
  ) -> tuple[TrainState, dict]:
    """Restores `step` onto the shardings in `abstract_state` (any mesh, any process count).

    Returns the state and the loop's own state (e.g. early stopping) saved with it.

    The data iterator continues exactly where it stopped, also when the checkpoint was saved by
    a different number of processes: its state counts global batches consumed, and the global
    stream is the same whatever the process count (see trainer.data.pipeline.train_iterator).
    """
    items = {
      "state": ocp.args.StandardRestore(serialization.to_state_dict(abstract_state)),
      "loop_state": ocp.args.JsonRestore(),
    }
    saved_iterators = self._saved_iterator_states(step)
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own in saved_iterators:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if own not in saved_iterators:
      states = {json.dumps(json.loads(text), sort_keys=True) for text in saved_iterators.values()}
      if len(states) != 1:
        raise ValueError(f"step {step}: processes saved different data positions: {states}")
      logging.info(
        "Step %d was saved by %d process(es), this run has %d: resuming the data stream at %s.",
        step,
        len(saved_iterators),
        jax.process_count(),
        states,
      )
      data_iterator.set_state(json.loads(states.pop()))
    state = serialization.from_state_dict(abstract_state, restored["state"])
    return state, restored["loop_state"]

  def _saved_iterator_states(self, step: int) -> dict[str, str]:
    """`{process_i-of-n.json: state}` as saved with `step`."""
    directory = epath.Path(self._manager.directory) / str(step) / "data_iter"
    return {path.name: path.read_text() for path in directory.glob("process_*-of-*.json")}

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def check_compatible(
  workdir: str, step: int, abstract_state: TrainState, config: ml_collections.ConfigDict
) -> None:
  """Raises ConfigError naming the first parameter whose checkpointed shape differs."""
  directory = checkpoint_dir(workdir)
  with open_manager(directory, read_only=True) as manager:
    metadata = manager.item_metadata(step)
    saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  saved = _shapes(metadata["state"])
  expected = _shapes(serialization.to_state_dict(abstract_state))
  mismatches = [
    f"{path}: checkpoint {saved.get(path, 'absent')}, this config {expected.get(path, 'absent')}"
    # Parameters first: they are what a user recognises in a model config.
    for path in sorted(
      saved.keys() | expected.keys(), key=lambda p: (not p.startswith("params/"), p)
    )
    if saved.get(path) != expected.get(path)
  ]
  if not mismatches:
    return
  config_diffs = _config_diffs(saved_config["config"], json.loads(config.to_json_best_effort()))
  raise ConfigError(
    f"{directory} holds step {step} of a run with an incompatible config: "
    f"{len(mismatches)} array(s) differ, first {mismatches[0]}."
    + (f" Config differences: {'; '.join(config_diffs)}." if config_diffs else "")
    + " Use a new --workdir, or the config that wrote this checkpoint."
  )


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
    for path, leaf in flat
    if hasattr(leaf, "shape")
  }


def _config_diffs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  diffs = []
  for section in _EXPLAINING_SECTIONS:
    before, now = saved.get(section, {}), current.get(section, {})
    for key in sorted(before.keys() | now.keys()):
      if before.get(key) != now.get(key):
        diffs.append(f"config.{section}.{key} was {before.get(key)!r}, now {now.get(key)!r}")
  return diffs
