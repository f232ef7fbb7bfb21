"""Running a jitted function over N rows in fixed-size batches: one input shape, one compilation.

The last, short batch is padded to the full batch size and the padded rows' outputs are
dropped. Every function batched this way treats rows independently, so the valid rows'
results do not depend on the padding; `fill` still picks it, so that each caller keeps the
inputs it has always run: "edge" repeats the last valid row (real inputs, e.g. a caption
rather than an empty one), "zeros" appends zero rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import numpy as np

Fill = Literal["edge", "zeros"]


def _rows(arrays: Sequence[np.ndarray]) -> int:
    """The common leading length of the arrays."""
    if not arrays:
        raise ValueError("need at least one array to batch")
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"arrays differ in length: {[a.shape[0] for a in arrays]}")
    return n


def _padding(a: np.ndarray, extra: int, fill: Fill) -> np.ndarray:
    if fill == "edge":
        return np.repeat(a[-1:], extra, axis=0)
    if fill == "zeros":
        return np.zeros((extra,) + a.shape[1:], a.dtype)
    raise ValueError(f"fill must be 'edge' or 'zeros', got {fill!r}")


def pad_to(
    arrays: Sequence[np.ndarray], size: int, *, fill: Fill = "edge"
) -> tuple[list[np.ndarray], int]:
    """Each array's rows padded to `size`; returns (padded arrays, number of valid rows).

    Arrays already `size` long come back as they are (no copy).
    """
    arrays = [np.asarray(a) for a in arrays]
    n = _rows(arrays)
    if not 0 < n <= size:
        raise ValueError(f"cannot pad {n} rows to {size}")
    if n == size:
        return arrays, n
    return [np.concatenate([a, _padding(a, size - n, fill)]) for a in arrays], n


def padded_batches(
    arrays: Sequence[np.ndarray], batch_size: int, *, fill: Fill = "edge"
) -> Iterator[tuple[int, list[np.ndarray], int]]:
    """(start, rows start.. of each array padded to batch_size, valid rows), in order."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    arrays = [np.asarray(a) for a in arrays]
    for start in range(0, _rows(arrays), batch_size):
        padded, n = pad_to([a[start : start + batch_size] for a in arrays], batch_size, fill=fill)
        yield start, padded, n


def map_in_batches(
    fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int, *, fill: Fill = "edge"
) -> Any:
    """fn(*batch) over fixed-size batches of the arrays' rows; outputs trimmed, concatenated.

    `fn` returns any pytree of arrays with one row per input row; the result is that pytree
    of numpy arrays over all N rows. Empty inputs are refused (no output shape to give).
    """
    outs = [
        jax.tree.map(lambda o, n=n: np.asarray(o)[:n], fn(*batch))
        for _, batch, n in padded_batches(arrays, batch_size, fill=fill)
    ]
    if not outs:
        raise ValueError("no rows to map over")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
