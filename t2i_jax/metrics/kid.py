"""Kernel Inception Distance, as torchmetrics' `KernelInceptionDistance` computes it.

Reference convention: torchmetrics (after Binkowski et al. 2018): polynomial kernel
k(x, y) = (gamma x.y + coef)^degree with gamma = 1 / dim, coef 1, degree 3; the unbiased
MMD^2 estimate on `subsets` random subsets of `subset_size` samples of each side, each
subset an independent permutation prefix (real, then fake, per subset); the result is the
mean and the population (ddof 0) standard deviation over subsets. Where a side has fewer
samples than `subset_size`, the subsets take all of them (torchmetrics raises instead).

The subsets come from an explicit seed (numpy's PCG64, so the draws differ from torch's);
`kid_of_subsets` takes the index sets themselves for a draw made elsewhere. Kernels are
float32 matmuls at HIGHEST precision on the device; their row sums are totalled in
float64 on the host, where MMD's cancellation happens.

The streaming state keeps the features (KID has no sufficient statistics): update appends
a batch to one side, merge concatenates. The seeded subsets index positions, so merge the
shards in data order to reproduce one pass over all the data.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.metrics.base import Metric, real_fake_features


@functools.partial(jax.jit, static_argnames=("degree",))
def _kernel_sums(x: jax.Array, y: jax.Array, gamma: float, coef: float, degree: int):
    """Off-diagonal row sums of k(x, x) and k(y, y), and column sums of k(x, y)."""

    def kernel(a, b):
        dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
        return (dots * gamma + coef) ** degree

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    return (
        k_xx.sum(axis=1) - jnp.diagonal(k_xx),
        k_yy.sum(axis=1) - jnp.diagonal(k_yy),
        k_xy.sum(axis=0),
    )


def _mmd2(x, y, gamma: float, coef: float, degree: int) -> float:
    """Unbiased MMD^2 between two equally sized samples (torchmetrics' formula)."""
    m = x.shape[0]
    xx, yy, xy = (np.asarray(s, np.float64).sum() for s in _kernel_sums(x, y, gamma, coef, degree))
    return float((xx + yy) / (m * (m - 1)) - 2 * xy / m**2)


def subset_indices(
    n_real: int, n_fake: int, *, seed: int, subsets: int = 100, subset_size: int = 1000
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (real, fake) index sets of each subset: prefixes of independent permutations."""
    size = min(subset_size, n_real, n_fake)
    rng = np.random.default_rng(seed)
    return [
        (rng.permutation(n_real)[:size], rng.permutation(n_fake)[:size]) for _ in range(subsets)
    ]


def kid_of_subsets(
    real_features,
    fake_features,
    subsets: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> tuple[float, float]:
    """(mean, std) of MMD^2 over the given (real indices, fake indices) subsets."""
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {real.shape}, {fake.shape}")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    real_dev, fake_dev = jnp.asarray(real), jnp.asarray(fake)
    scores = []
    for idx_real, idx_fake in subsets:
        if len(idx_real) != len(idx_fake) or len(idx_real) < 2:
            raise ValueError("each subset needs the same number (>= 2) of real and fake samples")
        x, y = real_dev[jnp.asarray(idx_real)], fake_dev[jnp.asarray(idx_fake)]
        scores.append(_mmd2(x, y, gamma, coef, degree))
    values = np.asarray(scores)
    return float(values.mean()), float(values.std())


def kernel_inception_distance(
    real_features,
    fake_features,
    *,
    seed: int,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets [N, D], [M, D]."""
    indices = subset_indices(
        len(real_features), len(fake_features), seed=seed, subsets=subsets, subset_size=subset_size
    )
    return kid_of_subsets(
        real_features, fake_features, indices, degree=degree, gamma=gamma, coef=coef
    )


def kid_metric(
    *, seed: int, dim: int = 2048, subsets: int = 100, subset_size: int = 1000
) -> Metric:
    """Streaming KID: update(state, features [B, dim], real: bool); compute -> (mean, std)."""

    return real_fake_features(
        dim,
        lambda real, fake: kernel_inception_distance(
            real, fake, seed=seed, subsets=subsets, subset_size=subset_size
        ),
    )
