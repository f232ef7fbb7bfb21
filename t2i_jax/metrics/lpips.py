"""LPIPS v0.1 as a metric: the streaming mean and `t2i metrics lpips` over image folders.
The network and its distance are in nets/lpips.py (the VQ-VAE also trains with it)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from t2i_jax.batching import pad_to
from t2i_jax.errors import DataError
from t2i_jax.metrics import image_io
from t2i_jax.metrics.base import Metric, mean_metric
from t2i_jax.nets.lpips import LPIPS, load_lpips, lpips_distance

__all__ = ["LPIPS", "compare_images", "load_lpips", "lpips_distance", "lpips_metric"]


_jit_distance = jax.jit(lpips_distance)


def lpips_metric(params: LPIPS) -> Metric:
    """Streaming mean LPIPS: update(state, x, y) with NHWC batches in [-1, 1]."""
    # params travel as an argument, not a closure, so they are not baked in as constants.
    return mean_metric(functools.partial(_jit_distance, params))


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1] (lpips' im2tensor: x / 127.5 - 1)."""
    return images.astype(np.float32) / 127.5 - 1.0


def compare_images(
    path_a: str,
    path_b: str,
    *,
    net: str = "alex",
    backbone_weights: str | None = None,
    batch_size: int = 32,
) -> dict:
    """LPIPS between paired images of two folders (sorted order) or two image files."""
    model = load_lpips(net, backbone_weights)
    files_a, files_b = image_io.paired_images(path_a, path_b)
    if batch_size >= 1:  # image_batches reports a bad batch size
        batch_size = min(batch_size, len(files_a))
    per_image: list[float] = []
    for a, b, first in zip(
        image_io.image_batches(files_a, batch_size),
        image_io.image_batches(files_b, batch_size),
        range(0, len(files_a), batch_size),
        strict=True,
    ):
        if a.shape != b.shape:
            raise DataError(
                f"{files_a[first]} is {a.shape[2]}x{a.shape[1]} but {files_b[first]} is "
                f"{b.shape[2]}x{b.shape[1]}: LPIPS compares images of equal size"
            )
        # The last batch gets zero images: every batch runs the same compiled program.
        (a, b), n = pad_to([a, b], batch_size, fill="zeros")
        values = _jit_distance(model, to_model_range(a), to_model_range(b))
        per_image.extend(float(v) for v in np.asarray(values)[:n])
    return {
        "metric": f"lpips_{net}",
        "value": float(np.mean(np.asarray(per_image, np.float64))),
        "count": len(per_image),
        "per_image": per_image,
    }
