"""Gaussian feature statistics and the Frechet distance between them, as pytorch-fid.

The statistics stream: the state is (count, sum, sum of outer products) in float64 on the
host, so 50k images in any number of batches, devices or hosts merge to the same mean and
covariance. The covariance uses N - 1 (np.cov). The distance follows pytorch-fid's
`calculate_frechet_distance`: sqrtm of sigma1 @ sigma2; only if that is not finite, retry
with 1e-6 * I added to both; a complex result whose diagonal's imaginary part exceeds 1e-3
is an error, otherwise its real part is used.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
from scipy import linalg

from t2i_jax.errors import CheckpointError, MetricError
from t2i_jax.metrics.base import Metric, State


class GaussianStats(NamedTuple):
    """Mean and covariance of a set of features, with the number of samples behind them."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def digest(self) -> str:
        """Short hash of the statistics, logged beside every distance computed from them."""
        h = hashlib.sha256()
        for a in (self.mu, self.sigma):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        h.update(str(self.count).encode())
        return h.hexdigest()[:16]

    def save(self, path: str) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, count=self.count)

    @classmethod
    def load(cls, path: str) -> GaussianStats:
        """Statistics saved by `save` or by pytorch-fid (`mu`, `sigma`; no count: -1)."""
        try:
            with np.load(path) as f:
                count = int(f["count"]) if "count" in f else -1
                return cls(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), count)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # A .npy, a pickle, or an .npz without mu/sigma: the file's fault, named.
            raise CheckpointError(f"{path}: not a statistics file with mu and sigma ({e})") from e


def _init(dim: int) -> State:
    return {
        "count": np.zeros((), np.int64),
        "sum": np.zeros((dim,), np.float64),
        "outer": np.zeros((dim, dim), np.float64),
    }


def _update(state: State, features) -> State:
    x = np.asarray(features, np.float64)
    x = x.reshape(x.shape[0], -1)
    return {
        "count": state["count"] + x.shape[0],
        "sum": state["sum"] + x.sum(axis=0),
        "outer": state["outer"] + x.T @ x,
    }


def _merge(a: State, b: State) -> State:
    return {k: a[k] + b[k] for k in a}


def _compute(state: State) -> GaussianStats:
    n = int(state["count"])
    if n < 2:
        raise MetricError(f"Gaussian statistics need at least 2 samples, got {n}")
    mu = state["sum"] / n
    sigma = (state["outer"] - n * np.outer(mu, mu)) / (n - 1)
    return GaussianStats(mu, sigma, n)


def gaussian_stats(dim: int) -> Metric:
    """Streams features [B, dim] into their mean and (N - 1) covariance."""
    return Metric(lambda: _init(dim), _update, _merge, _compute)


def stats_of(features: np.ndarray) -> GaussianStats:
    """The statistics of one array of features [N, dim]."""
    metric = gaussian_stats(features.shape[-1])
    return metric.compute(metric.update(metric.init(), features))


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    sigma1, sigma2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError(f"statistics differ in dimension: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricError(
                f"Frechet distance: sqrtm has imaginary component {np.max(np.abs(covmean.imag))}"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
