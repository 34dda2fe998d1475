"""The device mesh and how parameters, optimizer state and batches are laid out over it.

Axes: `data` (batch split, parameters replicated), `fsdp` (batch split, parameters sharded),
`tensor` (hidden widths split). Parameters carry logical axis names; `config.mesh
.logical_axis_rules` maps those names to mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trainer.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def create_mesh(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {axis: config[axis] for axis in MESH_AXES}
  described = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
  fill_axes = [axis for axis, size in sizes.items() if size == -1]
  if len(fill_axes) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ConfigError(
      f"mesh {described} is invalid: sizes must be positive, with at most one -1 "
      "(config.mesh.<axis>)"
    )
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill_axes:
    if len(devices) % fixed:
      raise ConfigError(
        f"mesh {described}: {len(devices)} devices do not divide by {fixed}; "
        "choose axis sizes whose product divides the device count"
      )
    sizes[fill_axes[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ConfigError(
      f"mesh {described} needs {math.prod(sizes.values())} devices but {len(devices)} are "
      f"present; make the product of config.mesh.data/fsdp/tensor equal {len(devices)} "
      "(or set one of them to -1)"
    )
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  try:
    device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Device subsets and CPU devices have no physical topology to honour.
    device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data-parallel device, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_to_shardings(
  boxed_abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str | Sequence[str] | None]]
) -> Any:
  """NamedShardings for the unboxed version of a tree of `nn.Partitioned` abstract values.

  A dimension that the mapped mesh axes do not divide is replicated instead (with a warning),
  so small layers such as a 10-way classifier head still run on any mesh.
  """
  rules = [tuple(rule) for rule in rules]
  logical_specs = nn.get_partition_spec(boxed_abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  abstract = nn.meta.unbox(boxed_abstract_tree)
  replicated_dims = []

  def fit(path, leaf, spec):
    spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    fitted = []
    for dim, axes in zip(leaf.shape, tuple(spec) + (None,) * (leaf.ndim - len(spec)), strict=True):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      if dim % math.prod(mesh.shape[name] for name in names):
        replicated_dims.append(f"{jax.tree_util.keystr(path)} dim {dim} over {names}")
        axes = None
      fitted.append(axes)
    return NamedSharding(mesh, PartitionSpec(*fitted))

  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  specs = jax.tree_util.tree_leaves(
    mesh_specs, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec)
  )
  specs = [spec for spec in specs if spec is not None] if len(specs) != len(leaves) else specs
  if len(specs) != len(leaves):
    raise ValueError(f"{len(specs)} partition specs for {len(leaves)} arrays")
  shardings = treedef.unflatten(
    fit(path, leaf, spec) for (path, leaf), spec in zip(leaves, specs, strict=True)
  )
  if replicated_dims:
    logging.warning(
      "Replicating %d parameter dimension(s) the mesh does not divide: %s",
      len(replicated_dims),
      "; ".join(replicated_dims),
    )
  return shardings


def check_sharding(tree: Any, expected_shardings: Any) -> None:
  """Raises if any array in `tree` is not laid out as `expected_shardings` says."""
  wrong = []

  def check(path, array, expected):
    if not array.sharding.is_equivalent_to(expected, array.ndim):
      wrong.append(f"{jax.tree_util.keystr(path)}: {array.sharding} != {expected}")

  jax.tree_util.tree_map_with_path(check, tree, expected_shardings)
  if wrong:
    raise AssertionError("arrays are not sharded as planned:\n  " + "\n  ".join(wrong))
