"""Inception Score, as torchmetrics' `InceptionScore` computes it from logits.

Reference convention: torchmetrics. The logits [N, C] are shuffled, softmaxed and cut into
`splits` (10) consecutive chunks the way `torch.chunk` cuts them (chunks of ceil(N / splits),
so fewer chunks when N is not a multiple); per chunk the score is
exp(mean_i sum_c p_ic (log p_ic - log mean_j p_jc)), and the result is the mean and the
sample (ddof 1) standard deviation over chunks. The shuffle comes from an explicit seed
(numpy's PCG64, so it differs from torch.randperm's); `seed=None` keeps the given order.

Logits are the FID Inception's `fc` output (`t2i_jax.metrics.fid.FidInception`), with its
bias; torchmetrics' default extractor (torch-fidelity's `logits_unbiased`) drops the bias,
so on the same weights the two differ by that choice of input, not by the formula.
Computed in float64 on the host. The streaming state is the logits; merge concatenates, so
merge the shards in data order to reproduce one pass (the seeded shuffle is positional).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from t2i_jax.metrics.base import Metric, State


def _torch_chunks(n: int, splits: int) -> list[slice]:
    """The slices `torch.chunk(x, splits)` makes of n rows."""
    size = math.ceil(n / splits)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def inception_score(logits, *, seed: int | None, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` chunks of the (shuffled) logits."""
    x = np.asarray(logits, np.float64)
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"expected logits [N >= splits={splits}, C], got shape {x.shape}")
    if seed is not None:
        x = x[np.random.default_rng(seed).permutation(x.shape[0])]
    log_p = special.log_softmax(x, axis=1)
    p = np.exp(log_p)
    scores = []
    for chunk in _torch_chunks(x.shape[0], splits):
        log_mean = np.log(p[chunk].mean(axis=0, keepdims=True))
        kl = (p[chunk] * (log_p[chunk] - log_mean)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    values = np.asarray(scores)
    return float(values.mean()), float(values.std(ddof=1))


def inception_score_metric(
    *, seed: int | None, splits: int = 10, num_classes: int = 1008
) -> Metric:
    """Streaming IS: update(state, logits [B, num_classes]); compute -> (mean, std)."""

    def init() -> State:
        return np.zeros((0, num_classes), np.float32)

    def update(state: State, logits) -> State:
        return np.concatenate([state, np.asarray(logits, np.float32).reshape(-1, num_classes)])

    def merge(a: State, b: State) -> State:
        return np.concatenate([a, b])

    def compute(state: State) -> tuple[float, float]:
        return inception_score(state, seed=seed, splits=splits)

    return Metric(init, update, merge, compute)
