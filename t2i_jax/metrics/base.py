"""The metric contract: four pure functions over a pytree state.

`update` folds a batch into the state, `merge` combines states from different devices,
hosts or data shards, and `compute` turns the state into the value, so any number of images
can be streamed and the same number comes out however the data were split. States of
per-image means are (sum, count) pairs; `merge` adds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

State = Any


@dataclasses.dataclass(frozen=True)
class Metric:
    """init() -> state; update(state, *inputs) -> state; merge(a, b) -> state; compute(state)."""

    init: Callable[[], State]
    update: Callable[..., State]
    merge: Callable[[State, State], State]
    compute: Callable[[State], Any]


def add_states(a: State, b: State) -> State:
    """merge for states whose every leaf is a sum."""
    return jax.tree.map(lambda x, y: x + y, a, b)


def real_fake_features(dim: int, compute: Callable[[np.ndarray, np.ndarray], Any]) -> Metric:
    """A metric over two sets of features kept whole (KID, precision/recall).

    update(state, features [B, dim], real: bool) appends to one side; merge concatenates, so
    shards merged in data order equal one pass; compute(state) = compute(real, fake).
    """

    def init() -> State:
        empty = np.zeros((0, dim), np.float32)
        return {"real": empty, "fake": empty}

    def update(state: State, features, real: bool) -> State:
        side = "real" if real else "fake"
        batch = np.asarray(features, np.float32).reshape(-1, dim)
        return {**state, side: np.concatenate([state[side], batch])}

    def merge(a: State, b: State) -> State:
        return {k: np.concatenate([a[k], b[k]]) for k in a}

    return Metric(init, update, merge, lambda state: compute(state["real"], state["fake"]))


def _finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def mean_metric(per_image: Callable[..., jax.Array]) -> Metric:
    """A metric that averages `per_image(*inputs) -> [B]` over all images seen.

    The sum is float32 with a Kahan compensation term, so a stream of many batches loses no
    more precision than one pass over all of them. An infinite value (PSNR of identical
    images) makes the mean infinite; the compensation is kept finite so it never turns the
    sum into NaN.
    """

    def init() -> State:
        zero = jnp.zeros((), jnp.float32)
        return {"sum": zero, "compensation": zero, "count": jnp.zeros((), jnp.int32)}

    def update(state: State, *inputs) -> State:
        values = per_image(*inputs).astype(jnp.float32)
        y = jnp.sum(values) - state["compensation"]
        total = state["sum"] + y
        return {
            "sum": total,
            "compensation": _finite_or_zero((total - state["sum"]) - y),
            "count": state["count"] + values.shape[0],
        }

    def merge(a: State, b: State) -> State:
        total = a["sum"] + b["sum"]
        return {
            "sum": total,
            # The rounding of this addition joins the compensation, as in update.
            "compensation": _finite_or_zero(
                a["compensation"] + b["compensation"] + ((total - a["sum"]) - b["sum"])
            ),
            "count": a["count"] + b["count"],
        }

    def compute(state: State) -> jax.Array:
        return (state["sum"] - state["compensation"]) / state["count"]

    return Metric(init, update, merge, compute)
