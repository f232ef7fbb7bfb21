"""The device mesh and the shardings of the state and the batch.

The mesh has three named axes, outermost first: `data` (pure data parallelism: a full
copy of the state per slice), `fsdp` (data parallelism with the parameters and optimizer
state split across it, gathered layer by layer by XLA), and `tensor` (reserved; size 1).
The batch is split over `data` and `fsdp` together. Parameters carry logical axis names
(`partitioning`); `LOGICAL_RULES` maps them to mesh axes, and tensors under
`mesh.min_shard_size` elements stay replicated. The same code runs on 1 CPU, 8 GPUs or a
multi-host TPU pod: the mesh spans every device of every process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t2i_jax import partitioning as part
from t2i_jax.errors import ConfigError

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over both

# Logical axis -> mesh axis, tried in order for each tensor: a mesh axis shards at most one
# dimension of it, and only one it divides evenly. So a conv kernel splits its output
# channels (else its input channels), a dense kernel its input width (else its output).
LOGICAL_RULES: tuple[tuple[str, str], ...] = (
    (part.CONV_OUT, FSDP),
    (part.EMBED, FSDP),
    (part.VOCAB, FSDP),
    (part.CONV_IN, FSDP),
    (part.MLP, FSDP),
    (part.HEADS, FSDP),
    (part.HEADS, TENSOR),
    (part.MLP, TENSOR),
)
# Below this many elements a tensor is replicated: gathering it costs more than it saves.
MIN_SHARD_SIZE = 2**14


def mesh_config(config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The config's `mesh` section, or the default (all devices on `data`) for configs
    and runs from before it existed."""
    default = ml_collections.ConfigDict(
        {"data": -1, "fsdp": 1, "tensor": 1, "min_shard_size": MIN_SHARD_SIZE, "cpu_devices": 0}
    )
    if config is None or "mesh" not in config:
        return default
    default.update(config.mesh)
    return default


def mesh_shape(config: ml_collections.ConfigDict | None, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes; one -1 takes the devices the others leave."""
    mesh = mesh_config(config)
    sizes = [int(mesh[axis]) for axis in MESH_AXES]
    shown = lambda: ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"mesh sizes must be positive, with at most one -1: {shown()}")
    if sizes[2] != 1:
        raise ConfigError(f"mesh.tensor={sizes[2]}: tensor parallelism is reserved (size 1)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {shown()} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {shown()} needs {math.prod(sizes)} devices, there are {num_devices}"
        )
    return tuple(sizes)


def make_mesh(
    devices: Sequence[jax.Device] | None = None, config: ml_collections.ConfigDict | None = None
) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every process's)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    try:  # Places neighbouring mesh positions on physically close devices (TPU, GPU).
        grid = mesh_utils.create_device_mesh(shape, devices, contiguous_submeshes=False)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_of(tree) -> Mesh | None:
    """The mesh of the first NamedSharding-placed array in `tree`, or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over `data` and `fsdp`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many parts the batch is split into: a batch size must be a multiple."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def logical_to_mesh(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, min_size: int = MIN_SHARD_SIZE
) -> PartitionSpec:
    """The PartitionSpec of one tensor from its logical axis names (see LOGICAL_RULES)."""
    spec: list[str | None] = [None] * len(shape)
    if math.prod(shape) < min_size:
        return PartitionSpec()
    used: set[str] = set()
    for logical, axis in LOGICAL_RULES:
        size = mesh.shape[axis]
        if size == 1 or axis in used:
            continue
        for i, name in enumerate(names):
            if name == logical and spec[i] is None and shape[i] % size == 0:
                spec[i] = axis
                used.add(axis)
                break
    return PartitionSpec(*spec)


def state_shardings(boxed, mesh: Mesh, min_size: int = MIN_SHARD_SIZE):
    """NamedShardings for the unboxed version of `boxed` (an init's output or its
    eval_shape, with `nn.Partitioned` leaves); unannotated leaves are replicated."""
    is_box = lambda x: isinstance(x, nn.Partitioned)

    def one(leaf):
        if is_box(leaf):
            # A box may hold a subtree with no arrays (optax's MaskedNode where an optimizer
            # mask leaves a parameter out): mapped over, it stays leafless as unboxed.
            return jax.tree.map(
                lambda v: NamedSharding(mesh, logical_to_mesh(leaf.names, v.shape, mesh, min_size)),
                leaf.value,
            )
        return replicated(mesh)

    return jax.tree.map(one, boxed, is_leaf=is_box)


def abstract_with_sharding(tree, sharding):
    """ShapeDtypeStructs carrying `sharding` (one, or a tree like `tree`'s): restore
    targets and jit out_shardings."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, sharding
    )


def rows_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """Where `rows` rows of a batch computed on `mesh` go: split over the batch axes when
    they divide `rows` (each device samples its part), else whole on every device."""
    return batch_sharding(mesh) if rows % batch_shards(mesh) == 0 else replicated(mesh)


def put_global(tree, where: NamedSharding):
    """numpy arrays that every process holds whole -> global arrays placed as `where`
    (each process fills its own devices' parts; also across processes)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, where, lambda index: x[index]), tree
    )


def to_host(tree):
    """numpy copies of (possibly sharded, possibly multi-process) arrays: whole values on
    every process."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))  # any local copy is all of it
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)
