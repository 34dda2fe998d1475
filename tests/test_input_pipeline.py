"""grain pipelines: exact resume from any state, full eval coverage, the file formats."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import base
from trainer import partitioning
from trainer.data import pipeline as input_pipeline
from trainer.data import sources as data_sources


def _data_config(**overrides):
  config = base.get_base_config().data
  config.update(overrides)
  return config


def _sharding(devices):
  mesh = partitioning.create_mesh(
    ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices
  )
  return partitioning.batch_sharding(mesh)


def _iterator(dataset, sharding, batch=16, seed=3):
  return input_pipeline.train_iterator(
    dataset,
    global_batch_size=batch,
    seed=seed,
    shuffle=True,
    worker_threads=2,
    prefetch_batches=3,
    sharding=sharding,
  )


@pytest.mark.parametrize("resume_after", [0, 1, 7, 40])
def test_train_iterator_resumes_exactly(resume_after):
  dataset = data_sources.load_dataset(_data_config(name="digits"))
  sharding = _sharding(jax.devices())
  reference = _iterator(dataset, sharding)
  expected = [np.asarray(next(reference)["labels"]) for _ in range(resume_after + 5)]

  first = _iterator(dataset, sharding)
  for _ in range(resume_after):
    next(first)
  state = first.get_state()
  resumed = _iterator(dataset, sharding)
  resumed.set_state(state)
  got = [np.asarray(next(resumed)["labels"]) for _ in range(5)]
  np.testing.assert_array_equal(np.stack(got), np.stack(expected[resume_after:]))


def test_train_iterator_epochs_cover_every_example_once():
  inputs = np.arange(40, dtype=np.float32)[:, None]  # Each example's input is its id.
  dataset = data_sources.Dataset(
    train=data_sources.ArraySource(inputs, np.zeros(40)),
    eval=None,
    num_classes=2,
    input_shape=(1,),
    mean=0.0,
    std=1.0,
    fingerprint="",
  )
  iterator = _iterator(dataset, _sharding(jax.devices()), batch=8)
  ids = np.concatenate([np.asarray(next(iterator)["inputs"])[:, 0] for _ in range(10)])
  for epoch in (ids[:40], ids[40:]):
    assert sorted(epoch) == list(range(40))
  assert not np.array_equal(ids[:40], ids[40:])  # Reshuffled each epoch.
  assert not np.array_equal(ids[:40], np.arange(40))  # Shuffled at all.


def test_batches_are_sharded_over_the_data_axes():
  dataset = data_sources.load_dataset(_data_config(name="digits"))
  batch = next(_iterator(dataset, _sharding(jax.devices()), batch=16))
  assert batch["inputs"].shape == (16, 8, 8, 1)
  assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 8, 8, 1)}


@pytest.mark.parametrize("batch", [8, 64, 400])
def test_eval_batches_cover_each_example_once(batch):
  dataset = data_sources.load_dataset(_data_config(name="digits"))
  seen = []
  for b in input_pipeline.eval_batches(
    dataset.eval, global_batch_size=batch, sharding=_sharding(jax.devices())
  ):
    mask = np.asarray(b["mask"]).astype(bool)
    assert mask.shape == (batch,)
    seen.append(np.asarray(b["inputs"])[mask])
  seen = np.concatenate(seen)
  assert len(seen) == len(dataset.eval) == 359
  np.testing.assert_array_equal(seen, dataset.eval.inputs)


def test_digits_split_is_fixed_and_disjoint():
  a = data_sources.load_dataset(_data_config(name="digits"))
  b = data_sources.load_dataset(_data_config(name="digits"))
  assert a.fingerprint == b.fingerprint
  assert len(a.train) + len(a.eval) == 1797
  train_rows = {x.tobytes() for x in a.train.inputs}
  assert sum(x.tobytes() in train_rows for x in a.eval.inputs) < 10  # Only true duplicates.
  assert (a.mean, a.std, a.num_classes, a.input_shape) == (0.0, 16.0, 10, (8, 8, 1))
  other = data_sources.load_dataset(_data_config(name="digits", split_seed=1))
  assert other.fingerprint != a.fingerprint


def test_npz_source(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 30), ("eval", 10)):
    np.savez(tmp_path / f"{split}.npz", x=rng.normal(size=(n, 4)), y=rng.integers(0, 3, n))
  dataset = data_sources.load_dataset(
    _data_config(
      name="npz",
      train_path=str(tmp_path / "train.npz"),
      eval_path=str(tmp_path / "eval.npz"),
      inputs_key="x",
      labels_key="y",
      mean=1.0,
      std=2.0,
    )
  )
  assert (len(dataset.train), len(dataset.eval), dataset.input_shape) == (30, 10, (4,))
  assert dataset.num_classes == 3
  assert (dataset.mean, dataset.std) == (1.0, 2.0)
  assert dataset.fingerprint.startswith("sha256-edges:")


def test_npz_wrong_key_names_the_available_arrays(tmp_path):
  np.savez(tmp_path / "d.npz", images=np.zeros((4, 2)), labels=np.zeros(4))
  config = _data_config(
    name="npz", train_path=str(tmp_path / "d.npz"), eval_path=str(tmp_path / "d.npz")
  )
  with pytest.raises(
    ValueError, match=r"has no array 'inputs'; its arrays are \['images', 'labels'\]"
  ):
    data_sources.load_dataset(config)


def test_array_record_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  inputs, labels = rng.normal(size=(12, 3, 2)).astype(np.float32), rng.integers(0, 5, 12)
  data_sources.write_array_record(str(tmp_path / "train.array_record"), inputs, labels)
  data_sources.write_array_record(str(tmp_path / "eval.array_record"), inputs[:4], labels[:4])
  dataset = data_sources.load_dataset(
    _data_config(
      name="array_record",
      train_path=str(tmp_path / "train*"),
      eval_path=str(tmp_path / "eval*"),
      num_classes=5,
    )
  )
  assert len(dataset.train) == 12 and dataset.input_shape == (3, 2)
  np.testing.assert_array_equal(dataset.train[5]["inputs"], inputs[5])
  assert dataset.train[5]["labels"] == labels[5]
  iterator = _iterator(dataset, _sharding(jax.devices()), batch=8)
  assert next(iterator)["inputs"].shape == (8, 3, 2)


def test_array_record_requires_num_classes(tmp_path):
  config = _data_config(name="array_record", train_path="x", eval_path="y")
  with pytest.raises(ValueError, match=r"config\.data\.num_classes"):
    data_sources.load_dataset(config)
