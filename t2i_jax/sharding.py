"""Device mesh and shardings: jit with NamedSharding, the batch split on `data`.

The same code runs on 1 CPU, 8 GPUs or a multi-host TPU pod: the mesh spans every
device of every process, state is replicated, the batch is split along `data`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def abstract_with_sharding(tree, sharding: NamedSharding):
    """ShapeDtypeStructs carrying `sharding` (restore targets and jit out_shardings)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def to_host(tree):
    """numpy copies of replicated arrays, also when they span several processes."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))  # Replicated: any local copy is all.
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)
