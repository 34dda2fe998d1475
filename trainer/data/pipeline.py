"""grain input pipelines that feed globally sharded batches to the jitted steps.

Every process walks the same shuffled global example stream and reads only its own
`global_batch / process_count` rows of each global batch (GlobalStreamBatches), so the stream does
not depend on the number of processes. The training iterator is a grain DatasetIterator whose
state is a small JSON dict (how many batches were consumed) that Orbax saves with the train state,
so a resumed run continues the exact stream, even on a different number of processes.

Sources with a vectorized `take` (in-memory arrays, packed text) read a whole batch in one call, in
the training loop's thread, right after the previous step was dispatched; in-memory arrays within
`device_resident_bytes` are copied to every device once and each batch is gathered there instead
(DeviceGather); per-example sources (ArrayRecord) read in grain's background threads, which keep
batches ready and copy them to the devices one batch ahead.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np
from grain import experimental as grain_experimental

from trainer.data.dataset import Dataset, Source
from trainer.errors import ConfigError

# Device-side buffer: one batch being consumed, one transferred ahead.
_DEVICE_BUFFER_BATCHES = 2


def per_process_batch_size(global_batch_size: int, data_parallel_size: int, name: str) -> int:
  """Validates a global batch against the mesh and returns this process's share of it."""
  if global_batch_size <= 0 or global_batch_size % data_parallel_size:
    raise ConfigError(
      f"global batch {global_batch_size} ({name}) is not divisible by the data-parallel "
      f"size {data_parallel_size} (mesh data x fsdp); use a multiple of {data_parallel_size}"
    )
  return global_batch_size // jax.process_count()


def train_iterator(
  dataset: Dataset,
  *,
  global_batch_size: int,
  seed: int,
  shuffle: bool,
  worker_threads: int,
  prefetch_batches: int,
  sharding: jax.sharding.NamedSharding,
  device_resident_bytes: int = 0,
) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of `{"inputs", "labels"}` global jax.Arrays.

  Its state is `{"next_index": batches consumed}` whichever way it reads, and the batches are
  the same. `worker_threads` and `prefetch_batches` apply to per-example sources only: a source
  with a vectorized `take` reads each batch in the calling thread (see InlineBatchIterator),
  from a copy on the devices when its `arrays` hold at most `device_resident_bytes` (0: never).
  """
  batches = GlobalStreamBatches(
    dataset.train,
    global_batch_size=global_batch_size,
    seed=seed,
    shuffle=shuffle,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  arrays = getattr(dataset.train, "arrays", None)  # Aligned arrays that `take` indexes.
  if arrays is not None and 0 < sum(a.nbytes for a in arrays.values()) <= device_resident_bytes:
    gather = DeviceGather(arrays, sharding)
    return InlineBatchIterator(lambda index: gather(batches.indices(index)))
  to_device = functools.partial(_to_global_arrays, sharding=sharding)
  if hasattr(dataset.train, "take"):
    return InlineBatchIterator(lambda index: to_device(batches[index]))
  read_options = grain.ReadOptions(
    num_threads=worker_threads, prefetch_buffer_size=prefetch_batches
  )
  iter_ds = grain_experimental.ThreadPrefetchIterDataset(
    grain.MapDataset.source(batches).to_iter_dataset(read_options),
    prefetch_buffer_size=prefetch_batches,
  )
  # The host-to-device copy runs in its own thread, one batch ahead of the step.
  iter_ds = grain_experimental.ThreadPrefetchIterDataset(
    iter_ds.map(to_device), prefetch_buffer_size=_DEVICE_BUFFER_BATCHES
  )
  return iter(iter_ds)


class InlineBatchIterator(grain.DatasetIterator):
  """Batch k as `read(k)` returns it (on the devices), when asked, in the caller's thread.

  For sources whose whole-batch read is cheap (one vectorized `take`, ~25 us for 128 examples):
  called right after the previous step was dispatched, the read and copy overlap that step.
  Handing such reads to background threads costs the loop more host time than it hides (thread
  handoffs, GIL contention, grain's per-stage bookkeeping): for 128 16x16x3 examples on a 2-core
  CPU, 0.19 ms of CPU a batch here against 0.57 ms through grain's threaded prefetch stages
  (docs/benchmarks.md, trainer overhead). The state has the format of grain's own iterators, so a
  checkpoint resumes with either kind.
  """

  def __init__(self, read: Callable[[int], dict[str, jax.Array]]):
    super().__init__()
    self._read = read
    self._next_index = 0

  def __next__(self) -> dict[str, jax.Array]:
    batch = self._read(self._next_index)
    self._next_index += 1
    return batch

  def get_state(self) -> dict:
    return {"next_index": self._next_index}

  def set_state(self, state: dict) -> None:
    self._next_index = state["next_index"]


class DeviceGather:
  """A source's aligned arrays, copied once to every device of `sharding`'s mesh; called with
  this process's example indices of a batch, it gathers those rows on the devices.

  Why: at a ~1.5 ms step the host's copy of each batch (a numpy gather, then `device_put`) is
  ~10% of the loop on a 2-core CPU (docs/benchmarks.md, issue 15). Rows are gathered from each
  device's own replica, so the batch is born with `sharding` and nothing moves between devices.
  (Gathering inside the train step's own computation instead saved nothing measurable: the
  gather's dispatch overlaps the previous step.)
  """

  def __init__(self, arrays: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding):
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    self._arrays = {
      # From a callback: every process holds the same arrays (each reads its rows from them).
      name: jax.make_array_from_callback(array.shape, replicated, lambda index, a=array: a[index])
      for name, array in arrays.items()
    }
    self._sharding = sharding
    self._multi_process = jax.process_count() > 1  # Read once: __call__ runs every step.
    self._index_dtype = np.int32 if len(next(iter(arrays.values()))) < 2**31 else np.int64
    self._gather = jax.jit(
      _gather_rows, in_shardings=(replicated, sharding), out_shardings=sharding
    )

  def __call__(self, indices: np.ndarray) -> dict[str, jax.Array]:
    indices = indices.astype(self._index_dtype)
    if self._multi_process:
      indices = jax.make_array_from_process_local_data(self._sharding, indices)
    # With one process jit places the host array itself, for less than a device_put costs.
    return self._gather(self._arrays, indices)


def _gather_rows(arrays: dict[str, jax.Array], indices: jax.Array) -> dict[str, jax.Array]:
  return {name: array[indices] for name, array in arrays.items()}


class GlobalStreamBatches:
  """Random access to this process's rows of global batch k, read a whole batch at a time.

  The global stream: epoch e is a permutation of the examples seeded by (seed, e), epochs
  concatenated, batches free to span an epoch boundary (no example is ever dropped). Global batch
  k is the stream's rows [k * global, (k + 1) * global); process i of n reads rows
  [k * global + i * local, k * global + (i + 1) * local). The stream does not depend on the
  number of processes: 2 processes x 4 devices see exactly the batches 1 process x 8 devices does.

  Reading a batch is one vectorized `take(indices)` on sources that offer it (in-memory arrays,
  packed text); per-example reads through grain's `batch` cost ~40 us of Python per example, which
  a small model's step cannot hide.
  """

  def __init__(
    self,
    source: Source,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    process_index: int,
    process_count: int,
  ):
    if len(source) == 0:
      raise ConfigError("the training split is empty; check config.data")
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.seed = seed
    self.shuffle = shuffle
    self._permutations: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize  # Endless: batch k exists for every k.

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._permutations.get(epoch)
    if permutation is None:
      n = len(self.source)
      permutation = (
        np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      )
      permutation.flags.writeable = False  # indices() hands out slices of it.
      # A batch touches at most two epochs; keep the latest few.
      self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 2}
      self._permutations[epoch] = permutation
    return permutation

  def indices(self, index: int) -> np.ndarray:
    """Example indices of this process's rows of global batch `index`."""
    start = index * self.global_batch_size + self.process_index * self.local_batch_size
    epoch, offset = divmod(start, len(self.source))
    if offset + self.local_batch_size <= len(self.source):  # Within one epoch: a slice.
      return self._permutation(epoch)[offset : offset + self.local_batch_size]
    epochs, offsets = np.divmod(np.arange(start, start + self.local_batch_size), len(self.source))
    indices = np.empty(self.local_batch_size, np.int64)
    for epoch in np.unique(epochs):
      rows = epochs == epoch
      indices[rows] = self._permutation(int(epoch))[offsets[rows]]
    return indices

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return take(self.source, self.indices(index))


def take(source: Source, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Stacked examples `indices` of `source`, in one read where the source supports it."""
  if hasattr(source, "take"):
    return source.take(indices)
  examples = [source[int(i)] for i in indices]
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def local_batches(
  source: Source,
  *,
  global_batch_size: int,
  seed: int,
  shuffle: bool,
  process_index: int,
  process_count: int,
) -> grain.MapDataset:
  """This process's rows of every global batch (see GlobalStreamBatches) as a grain dataset."""
  return grain.MapDataset.source(
    GlobalStreamBatches(
      source,
      global_batch_size=global_batch_size,
      seed=seed,
      shuffle=shuffle,
      process_index=process_index,
      process_count=process_count,
    )
  )


def eval_batches(
  source: Source,
  *,
  global_batch_size: int,
  sharding: jax.sharding.NamedSharding,
  max_batches: int = 0,
) -> Iterator[dict[str, jax.Array]]:
  """One pass over `source`, every example exactly once; padding rows carry `mask` 0.

  Process i reads examples i, i + n, i + 2n, ...; every process yields the same number of
  batches (collectives need it), padding its last ones. `max_batches` > 0 stops after that many
  batches (a fixed subset, the same at every eval).
  """
  local_batch = global_batch_size // jax.process_count()
  own = np.arange(jax.process_index(), len(source), jax.process_count())
  largest_shard = math.ceil(len(source) / jax.process_count())
  num_batches = math.ceil(largest_shard / local_batch)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  for b in range(num_batches):
    indices = own[b * local_batch : (b + 1) * local_batch]
    batch = take(source, indices) if len(indices) else None
    yield _to_global_arrays(_pad_batch(batch, local_batch, source), sharding)


def _pad_batch(batch: dict | None, size: int, source: Source) -> dict[str, np.ndarray]:
  if batch is None:  # This process ran out of examples before the others.
    example = source[0]
    batch = {k: np.zeros((0, *np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}
  num_real = len(next(iter(batch.values())))
  padded = {
    k: np.concatenate([v, np.zeros((size - num_real, *v.shape[1:]), v.dtype)])
    for k, v in batch.items()
  }
  padded["mask"] = (np.arange(size) < num_real).astype(np.float32)
  return padded


def _to_global_arrays(
  batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
  batch = {k: np.asarray(v) for k, v in batch.items()}
  if jax.process_count() == 1:
    # What make_array_from_process_local_data does with one process, without its per-call checks.
    return jax.device_put(batch, sharding)
  return jax.make_array_from_process_local_data(sharding, batch)
