"""Improved precision and recall (Kynkaanniemi et al. 2019) of generated against real features.

Reference convention: the paper's code. Each sample of a set gets a ball whose radius is
the distance to its k-th nearest neighbour (k = 3) in the same set, itself excluded. The
precision is the fraction of generated samples inside at least one real ball (distance <=
radius); the recall is the fraction of real samples inside at least one generated ball.
Squared Euclidean distances (||a||^2 - 2 a.b + ||b||^2, float32, HIGHEST precision) are
computed on the device in blocks of rows, so only [block, N] distances exist at a time.

The streaming state keeps the features; merge concatenates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.batching import padded_batches
from t2i_jax.metrics.base import Metric, real_fake_features


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(a * a, axis=1)[:, None] - 2 * dots + jnp.sum(b * b, axis=1)[None, :]
    return jnp.maximum(d, 0)  # rounding can make a tiny distance negative


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_neighbour_block(rows: jax.Array, start: jax.Array, features: jax.Array, k: int):
    d = _squared_distances(rows, features)
    own = jnp.arange(features.shape[0])[None, :] == (start + jnp.arange(rows.shape[0]))[:, None]
    d = jnp.where(own, jnp.inf, d)  # a sample is not its own neighbour
    return -jax.lax.top_k(-d, k)[0][:, k - 1]


@jax.jit
def _inside_any_block(queries: jax.Array, refs: jax.Array, radii: jax.Array) -> jax.Array:
    return jnp.any(_squared_distances(queries, refs) <= radii[None, :], axis=1)


def knn_radii(features, k: int = 3, *, block_size: int = 1024) -> np.ndarray:
    """Squared distance of each sample to its k-th nearest other sample, [N]."""
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or x.shape[0] <= k:
        raise ValueError(f"need features [N > k={k}, D], got shape {x.shape}")
    block_size = min(block_size, x.shape[0])
    x_dev = jnp.asarray(x)
    # Blocks of block_size rows, the last one padded with zeros: one compiled shape.
    out = [
        np.asarray(_kth_neighbour_block(jnp.asarray(block), start, x_dev, k))[:n]
        for start, (block,), n in padded_batches([x], block_size, fill="zeros")
    ]
    return np.concatenate(out)


def _coverage(queries: np.ndarray, refs: np.ndarray, radii: np.ndarray, block_size: int) -> float:
    """Fraction of queries inside at least one reference ball."""
    block_size = min(block_size, queries.shape[0])
    refs_dev, radii_dev = jnp.asarray(refs), jnp.asarray(radii)
    inside = [
        np.asarray(_inside_any_block(jnp.asarray(block), refs_dev, radii_dev))[:n]
        for _, (block,), n in padded_batches([queries], block_size, fill="zeros")
    ]
    return float(np.concatenate(inside).mean())


def precision_recall(
    real_features, fake_features, *, k: int = 3, block_size: int = 1024
) -> tuple[float, float]:
    """(precision, recall) of generated features [M, D] against real features [N, D]."""
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {real.shape}, {fake.shape}")
    precision = _coverage(fake, real, knn_radii(real, k, block_size=block_size), block_size)
    recall = _coverage(real, fake, knn_radii(fake, k, block_size=block_size), block_size)
    return precision, recall


def precision_recall_metric(*, k: int = 3, dim: int = 2048) -> Metric:
    """Streaming P/R: update(state, features [B, dim], real: bool); compute -> (P, R)."""

    return real_fake_features(dim, lambda real, fake: precision_recall(real, fake, k=k))
