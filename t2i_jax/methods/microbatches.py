"""Gradient accumulation: one step's batch as K microbatches inside the compiled step.

`train.grad_accum_steps = K` runs a player's loss and gradient on K microbatches in a
`lax.scan` and applies the mean gradient once, so a batch K times larger than what fits
in memory gives the result of the large batch: the same data, and the same random draws.

The draws are the same because a loss draws its per-example randomness (timesteps, noise,
caption dropout, z) through `Rows`: the draw has the whole batch's shape, from the same key
as without accumulation, and the microbatch takes its rows of it. Randomness inside a
network (dropout masks, StyleGAN's noise inputs) comes from `Rows.key`: one key per
microbatch, so it has the same distribution but not the same numbers as the large batch's.

Microbatch i of K holds rows i, i + K, i + 2K, ... of the batch: the batch is sharded over
devices by contiguous rows, so every device keeps an equal share of every microbatch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Rows:
    """Which rows of the step's batch a loss sees: microbatch `index` of `count`."""

    index: jax.Array | int = 0
    count: int = 1

    def take(self, full: jax.Array) -> jax.Array:
        """This microbatch's rows of a whole-batch array (the array itself when count=1)."""
        if self.count == 1:
            return full
        rows = full.reshape(full.shape[0] // self.count, self.count, *full.shape[1:])
        return jax.lax.dynamic_index_in_dim(rows, self.index, axis=1, keepdims=False)

    def _whole(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0] * self.count, *shape[1:])

    def normal(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return self.take(jax.random.normal(key, self._whole(shape), dtype))

    def randint(self, key: jax.Array, shape: tuple[int, ...], low: int, high: int) -> jax.Array:
        return self.take(jax.random.randint(key, self._whole(shape), low, high))

    def uniform(
        self, key: jax.Array, shape: tuple[int, ...], minval: float = 0.0, maxval: float = 1.0
    ) -> jax.Array:
        return self.take(jax.random.uniform(key, self._whole(shape), jnp.float32, minval, maxval))

    def bernoulli(self, key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
        return self.take(jax.random.bernoulli(key, p, self._whole(shape)))

    def key(self, key: jax.Array) -> jax.Array:
        """A key for randomness drawn inside a network: the key itself for the whole batch,
        one folded with the microbatch's index otherwise."""
        return key if self.count == 1 else jax.random.fold_in(key, self.index)


WHOLE = Rows()


def split(examples: Any, count: int) -> Any:
    """Every leaf [B, ...] -> [count, B / count, ...]: microbatch i is rows i, i + count, ..."""

    def one(x):
        if x.shape[0] % count:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {count} microbatches")
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, examples)


def merge(stacked: Any) -> Any:
    """The per-microbatch outputs of a scan, as for the whole batch: per-microbatch scalars
    (stacked [K]) averaged; per-example arrays (stacked [K, b, ...]) back in row order."""

    def one(x):
        if x.ndim == 1:
            return jnp.mean(x, axis=0)
        return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    return jax.tree.map(one, stacked)
