"""grain pipelines: exact resume from any state, full eval coverage, the file formats."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import base
from trainer import partitioning
from trainer.data import Dataset, DataSpec, load_dataset
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


def _iterator(dataset, sharding, batch=16, seed=3, device_resident_bytes=0):
  return input_pipeline.train_iterator(
    dataset,
    global_batch_size=batch,
    seed=seed,
    shuffle=True,
    worker_threads=2,
    prefetch_batches=3,
    sharding=sharding,
    device_resident_bytes=device_resident_bytes,
  )


@pytest.mark.parametrize("resume_after", [0, 1, 7, 40])
def test_train_iterator_resumes_exactly(resume_after):
  dataset = load_dataset(_data_config(name="digits"))
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
  dataset = Dataset(
    train=data_sources.ArraySource(inputs, np.zeros(40)),
    validation=None,
    test=None,
    spec=DataSpec(kind="classification", input_shape=(1,), input_dtype="float32", num_classes=2),
  )
  iterator = _iterator(dataset, _sharding(jax.devices()), batch=8)
  ids = np.concatenate([np.asarray(next(iterator)["inputs"])[:, 0] for _ in range(10)])
  for epoch in (ids[:40], ids[40:]):
    assert sorted(epoch) == list(range(40))
  assert not np.array_equal(ids[:40], ids[40:])  # Reshuffled each epoch.
  assert not np.array_equal(ids[:40], np.arange(40))  # Shuffled at all.


def test_batches_are_sharded_over_the_data_axes():
  dataset = load_dataset(_data_config(name="digits"))
  batch = next(_iterator(dataset, _sharding(jax.devices()), batch=16))
  assert batch["inputs"].shape == (16, 8, 8, 1)
  assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 8, 8, 1)}


@pytest.mark.parametrize("mesh_shape", [dict(data=-1, fsdp=1), dict(data=2, fsdp=4)])
def test_device_resident_batches_are_the_host_batches(mesh_shape):
  """Gathered on the devices or copied from the host: the same rows with the same sharding,
  across epoch boundaries (400 of digits' 1257 training examples a batch) and after a resume."""
  dataset = load_dataset(_data_config(name="digits"))
  mesh = partitioning.create_mesh(ml_collections.ConfigDict(dict(tensor=1, **mesh_shape)))
  sharding = partitioning.batch_sharding(mesh)
  host = _iterator(dataset, sharding, batch=400)
  device = _iterator(dataset, sharding, batch=400, device_resident_bytes=2**30)
  for _ in range(7):
    expected, got = next(host), next(device)
    for key in ("inputs", "labels"):
      assert got[key].sharding == expected[key].sharding
      assert got[key].dtype == expected[key].dtype
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
  resumed = _iterator(dataset, sharding, batch=400, device_resident_bytes=2**30)
  resumed.set_state(device.get_state())
  assert device.get_state() == host.get_state() == {"next_index": 7}
  np.testing.assert_array_equal(np.asarray(next(resumed)["labels"]), next(host)["labels"])


@pytest.mark.parametrize("budget_bytes, on_device", [(0, False), (1000, False), (2**30, True)])
def test_training_arrays_go_to_the_devices_only_within_the_budget(
  monkeypatch, budget_bytes, on_device
):
  gathers = []

  class RecordingGather(input_pipeline.DeviceGather):
    def __init__(self, arrays, sharding):
      gathers.append(sum(a.nbytes for a in arrays.values()))
      super().__init__(arrays, sharding)

  monkeypatch.setattr(input_pipeline, "DeviceGather", RecordingGather)
  dataset = load_dataset(_data_config(name="digits"))  # 1257 x (64 + 1) x 4 bytes of training.
  next(_iterator(dataset, _sharding(jax.devices()), device_resident_bytes=budget_bytes))
  assert gathers == ([len(dataset.train) * 65 * 4] if on_device else [])


@pytest.mark.parametrize("batch", [8, 64, 400])
def test_eval_batches_cover_each_example_once(batch):
  dataset = load_dataset(_data_config(name="digits"))
  seen = []
  for b in input_pipeline.eval_batches(
    dataset.validation, global_batch_size=batch, sharding=_sharding(jax.devices())
  ):
    mask = np.asarray(b["mask"]).astype(bool)
    assert mask.shape == (batch,)
    seen.append(np.asarray(b["inputs"])[mask])
  seen = np.concatenate(seen)
  assert len(seen) == len(dataset.validation) == 270
  np.testing.assert_array_equal(seen, dataset.validation.inputs)


def test_eval_max_batches_reads_a_fixed_prefix():
  dataset = load_dataset(_data_config(name="digits"))

  def seen(max_batches):
    batches = input_pipeline.eval_batches(
      dataset.validation,
      global_batch_size=64,
      sharding=_sharding(jax.devices()),
      max_batches=max_batches,
    )
    return [np.asarray(b["inputs"])[np.asarray(b["mask"]).astype(bool)] for b in batches]

  two = seen(2)
  assert len(two) == 2 and sum(len(b) for b in two) == 128
  np.testing.assert_array_equal(np.concatenate(two), np.concatenate(seen(2)))  # Same each time.
  np.testing.assert_array_equal(np.concatenate(two), np.concatenate(seen(0))[:128])
  assert sum(len(b) for b in seen(0)) == 270


def test_digits_split_is_fixed_and_disjoint():
  a = load_dataset(_data_config(name="digits"))
  b = load_dataset(_data_config(name="digits"))
  assert a.spec.fingerprints == b.spec.fingerprints
  assert (len(a.train), len(a.validation), len(a.test)) == (1257, 270, 270)  # 70/15/15.
  rows = {name: {x.tobytes() for x in a.split(name).inputs} for name in ("train", "validation")}
  # Only true duplicates (identical images) appear in two splits.
  assert sum(x.tobytes() in rows["train"] for x in a.validation.inputs) < 10
  assert sum(x.tobytes() in rows["train"] | rows["validation"] for x in a.test.inputs) < 10
  spec = a.spec
  assert (spec.mean, spec.std, spec.num_classes, spec.input_shape) == (0.0, 16.0, 10, (8, 8, 1))
  assert len(set(spec.fingerprints.values())) == 3  # One per split, all different.
  other = load_dataset(_data_config(name="digits", split_seed=1))
  assert other.spec.fingerprints["test"] != spec.fingerprints["test"]
  assert other.fingerprint != a.fingerprint


def test_synthetic_data_has_three_distinct_splits():
  dataset = load_dataset(_data_config(name="synthetic", synthetic_eval_examples=64))
  assert (len(dataset.validation), len(dataset.test)) == (64, 64)
  assert not np.array_equal(dataset.validation.inputs, dataset.test.inputs)
  assert len(set(dataset.spec.fingerprints.values())) == 3


def test_npz_source(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 30), ("eval", 10), ("test", 7)):
    np.savez(tmp_path / f"{split}.npz", x=rng.normal(size=(n, 4)), y=rng.integers(0, 3, n))
  config = _data_config(
    name="npz",
    train_path=str(tmp_path / "train.npz"),
    eval_path=str(tmp_path / "eval.npz"),
    inputs_key="x",
    labels_key="y",
    mean=1.0,
    std=2.0,
  )
  dataset = load_dataset(config)
  assert (len(dataset.train), len(dataset.validation), dataset.spec.input_shape) == (30, 10, (4,))
  assert dataset.test is None  # No test_path: no test split.
  with pytest.raises(ValueError, match=r"no test split; .*config\.data\.test_path"):
    dataset.split("test")
  assert dataset.spec.num_classes == 3
  assert (dataset.spec.mean, dataset.spec.std) == (1.0, 2.0)
  assert dataset.spec.fingerprints["validation"].startswith("sha256-edges:")
  config.test_path = str(tmp_path / "test.npz")
  with_test = load_dataset(config)
  assert len(with_test.test) == 7
  assert with_test.spec.fingerprints["validation"] == dataset.spec.fingerprints["validation"]
  assert set(with_test.spec.fingerprints) == {"train", "validation", "test"}


def test_npz_wrong_key_names_the_available_arrays(tmp_path):
  np.savez(tmp_path / "d.npz", images=np.zeros((4, 2)), labels=np.zeros(4))
  config = _data_config(
    name="npz", train_path=str(tmp_path / "d.npz"), eval_path=str(tmp_path / "d.npz")
  )
  with pytest.raises(
    ValueError, match=r"has no array 'inputs'; its arrays are \['images', 'labels'\]"
  ):
    load_dataset(config)


def test_array_record_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  inputs, labels = rng.normal(size=(12, 3, 2)).astype(np.float32), rng.integers(0, 5, 12)
  data_sources.write_array_record(str(tmp_path / "train.array_record"), inputs, labels)
  data_sources.write_array_record(str(tmp_path / "eval.array_record"), inputs[:4], labels[:4])
  data_sources.write_array_record(str(tmp_path / "test.array_record"), inputs[4:9], labels[4:9])
  dataset = load_dataset(
    _data_config(
      name="array_record",
      train_path=str(tmp_path / "train*"),
      eval_path=str(tmp_path / "eval*"),
      test_path=str(tmp_path / "test*"),
      num_classes=5,
    )
  )
  assert len(dataset.train) == 12 and dataset.spec.input_shape == (3, 2)
  assert (len(dataset.validation), len(dataset.test)) == (4, 5)
  np.testing.assert_array_equal(dataset.test[0]["inputs"], inputs[4])
  assert len(set(dataset.spec.fingerprints.values())) == 3
  np.testing.assert_array_equal(dataset.train[5]["inputs"], inputs[5])
  assert dataset.train[5]["labels"] == labels[5]
  iterator = _iterator(dataset, _sharding(jax.devices()), batch=8)
  assert next(iterator)["inputs"].shape == (8, 3, 2)


def test_array_record_requires_num_classes(tmp_path):
  config = _data_config(name="array_record", train_path="x", eval_path="y")
  with pytest.raises(ValueError, match=r"config\.data\.num_classes"):
    load_dataset(config)
