"""Pixel metrics between pairs of images: PSNR, SSIM and MS-SSIM, per image.

Images are NHWC (batch first, any number of channels), float, on the scale given by the
required `data_range` (255 for uint8-valued images, 1 or 2 for normalised ones).

Conventions (exact constants, as the references):
- PSNR: 10 log10(data_range^2 / MSE), the MSE over H, W and C of each image; identical
  images give +inf.
- SSIM: tf.image.ssim / dm-pix. A normalised Gaussian window, 11 taps, sigma 1.5, applied
  separably with VALID convolution per channel; population (biased) local variances and
  covariance; C1 = (0.01 L)^2, C2 = (0.03 L)^2; the mean of the SSIM map over H, W and C.
  scikit-image gives the same number with `gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False` (its border crop is the VALID window).
- MS-SSIM: pytorch-msssim's `ms_ssim`. Weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333);
  at every level but the last the per-channel mean contrast-structure term, clipped at 0,
  then 2x2 average pooling (a zero pad of 1 on each side of an odd dimension, counted in the
  average); at the last level the per-channel SSIM, clipped at 0; the weighted product per
  channel, then the mean over channels.
- Streaming: every metric is per image, then the mean over all images (a Kahan-summed
  `mean_metric`), so any split into batches, devices or hosts gives the same value; the
  mean PSNR is +inf if any pair is identical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.errors import DataError, UserError
from t2i_jax.metrics import image_io
from t2i_jax.metrics.base import Metric, mean_metric

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both images as a float array of at least float32 ([B, H, W, C], equal shapes)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} and {y.shape}")
    if x.ndim != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got {x.shape}")
    # uint8 images would wrap around in x - y and x * y.
    dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    return x.astype(dtype), y.astype(dtype)


def _check_data_range(data_range: float) -> None:
    if isinstance(data_range, (int, float)) and not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")


def psnr(x: jax.Array, y: jax.Array, *, data_range: float) -> jax.Array:
    """Peak signal-to-noise ratio in dB of each pair, [B]; +inf for identical images."""
    _check_data_range(data_range)
    return _psnr(*_check_pair(x, y), data_range)


@jax.jit
def _psnr(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
    mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
    # mse == 0 gives log10(inf) = inf: identical images are infinitely close, not an error.
    # float32 first: an integer data_range (65535) would overflow when squared.
    return 10.0 * jnp.log10(jnp.square(jnp.asarray(data_range, jnp.float32)) / mse)


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian window centred on the middle tap (float64)."""
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: jax.Array, window: np.ndarray, axis: int) -> jax.Array:
    """VALID correlation of x with a 1-D window along one axis, as a sum of shifted slices.

    Slices instead of a convolution keep float32 arithmetic on every backend (no reduced
    precision convolution on accelerators) and need no per-channel grouping.
    """
    size = len(window)
    out_len = x.shape[axis] - size + 1
    w = window.astype(np.dtype(x.dtype))
    out = None
    for k in range(size):
        term = w[k] * jax.lax.slice_in_dim(x, k, k + out_len, axis=axis)
        out = term if out is None else out + term
    return out


class SSIMMaps(NamedTuple):
    """Local SSIM and its contrast-structure factor, [B, H - s + 1, W - s + 1, C]."""

    ssim: jax.Array
    cs: jax.Array


# Window and constants are static: they fix the shapes and the window's taps.
_SSIM_STATIC = ("filter_size", "filter_sigma", "k1", "k2")
_jit_ssim_args = functools.partial(jax.jit, static_argnames=_SSIM_STATIC)


def _check_ssim_args(x, y, data_range: float, filter_size: int):
    _check_data_range(data_range)
    x, y = _check_pair(x, y)
    if filter_size % 2 != 1:
        raise ValueError(f"filter_size must be odd, got {filter_size}")
    if min(x.shape[1:3]) < filter_size:
        raise ValueError(
            f"images of {x.shape[1]}x{x.shape[2]} pixels are smaller than the "
            f"{filter_size}x{filter_size} SSIM window"
        )
    return x, y


def _ssim_maps(x, y, data_range, filter_size, filter_sigma, k1, k2) -> SSIMMaps:
    window = gaussian_window(filter_size, filter_sigma)
    # The five local moments filtered together: E[x], E[y], E[x^2], E[y^2], E[xy].
    moments = jnp.stack([x, y, x * x, y * y, x * y])
    moments = _filter_valid(_filter_valid(moments, window, axis=2), window, axis=3)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    # Population moments (the window's weights sum to 1), as tf.image.ssim.
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return SSIMMaps(ssim=luminance * cs, cs=cs)


def _ssim_per_channel(x, y, *args) -> SSIMMaps:
    """Spatial means of the two maps, [B, C] each."""
    return SSIMMaps(*(jnp.mean(m, axis=(1, 2)) for m in _ssim_maps(x, y, *args)))


def ssim_map(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> SSIMMaps:
    """The SSIM map and the contrast-structure map over the VALID windows of each image."""
    x, y = _check_ssim_args(x, y, data_range, filter_size)
    return _ssim_map_jit(
        x, y, data_range, filter_size=filter_size, filter_sigma=filter_sigma, k1=k1, k2=k2
    )


@_jit_ssim_args
def _ssim_map_jit(x, y, data_range, *, filter_size, filter_sigma, k1, k2) -> SSIMMaps:
    return _ssim_maps(x, y, data_range, filter_size, filter_sigma, k1, k2)


def ssim(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Structural similarity of each pair, [B]: the mean of the SSIM map over H, W and C."""
    x, y = _check_ssim_args(x, y, data_range, filter_size)
    return _ssim_jit(
        x, y, data_range, filter_size=filter_size, filter_sigma=filter_sigma, k1=k1, k2=k2
    )


@_jit_ssim_args
def _ssim_jit(x, y, data_range, *, filter_size, filter_sigma, k1, k2) -> jax.Array:
    per_channel = _ssim_per_channel(x, y, data_range, filter_size, filter_sigma, k1, k2)
    # Every channel's map has the same size, so the mean of channel means is the map's mean.
    return jnp.mean(per_channel.ssim, axis=-1)


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
    """torch avg_pool2d(kernel 2, padding H % 2, W % 2): zero pads counted in the mean."""
    pads = [(0, 0), (x.shape[1] % 2,) * 2, (x.shape[2] % 2,) * 2, (0, 0)]
    x = jnp.pad(x, pads)
    # torch drops the last padded row / column that does not fill a window (floor mode).
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def ms_ssim_min_size(filter_size: int = 11, levels: int = len(MS_SSIM_WEIGHTS)) -> int:
    """The smallest side MS-SSIM accepts: larger than (filter_size - 1) * 2^(levels - 1)."""
    return (filter_size - 1) * 2 ** (levels - 1) + 1


def ms_ssim(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Multi-scale SSIM of each pair, [B], as pytorch-msssim's `ms_ssim`.

    The smaller side must exceed (filter_size - 1) * 2^(levels - 1) (160 for the defaults,
    pytorch-msssim's own bound), so the coarsest level still holds a full window.
    """
    weights = tuple(float(w) for w in weights)
    if not weights:
        raise ValueError("MS-SSIM needs at least one level weight")
    min_size = ms_ssim_min_size(filter_size, len(weights))
    x, y = _check_pair(x, y)
    if min(x.shape[1:3]) < min_size:
        raise ValueError(
            f"MS-SSIM needs images of at least {min_size}x{min_size} pixels for its "
            f"{len(weights) - 1} downsamplings with a {filter_size}-tap window, "
            f"got {x.shape[1]}x{x.shape[2]}"
        )
    x, y = _check_ssim_args(x, y, data_range, filter_size)
    return _ms_ssim_jit(
        x,
        y,
        data_range,
        weights=weights,
        filter_size=filter_size,
        filter_sigma=filter_sigma,
        k1=k1,
        k2=k2,
    )


@functools.partial(jax.jit, static_argnames=(*_SSIM_STATIC, "weights"))
def _ms_ssim_jit(x, y, data_range, *, weights, filter_size, filter_sigma, k1, k2) -> jax.Array:
    args = (data_range, filter_size, filter_sigma, k1, k2)
    factors = []
    for level in range(len(weights)):
        per_channel = _ssim_per_channel(x, y, *args)
        if level < len(weights) - 1:
            factors.append(jax.nn.relu(per_channel.cs))
            x, y = _avg_pool_2x2(x), _avg_pool_2x2(y)
    factors.append(jax.nn.relu(per_channel.ssim))
    stacked = jnp.stack(factors)  # [levels, B, C]
    w = jnp.asarray(weights, stacked.dtype).reshape(-1, 1, 1)
    return jnp.mean(jnp.prod(stacked**w, axis=0), axis=-1)


def _per_image_metric(fn: Callable[..., jax.Array], data_range: float) -> Metric:
    _check_data_range(data_range)
    return mean_metric(jax.jit(functools.partial(fn, data_range=data_range)))


def psnr_metric(data_range: float) -> Metric:
    """Mean over images of the per-image PSNR; update(state, x, y). +inf if any pair is equal."""
    return _per_image_metric(psnr, data_range)


def ssim_metric(data_range: float) -> Metric:
    """Mean over images of the per-image SSIM; update(state, x, y)."""
    return _per_image_metric(ssim, data_range)


def ms_ssim_metric(data_range: float) -> Metric:
    """Mean over images of the per-image MS-SSIM; update(state, x, y)."""
    return _per_image_metric(ms_ssim, data_range)


PER_IMAGE = {"psnr": psnr, "ssim": ssim, "ms_ssim": ms_ssim}
METRICS = {"psnr": psnr_metric, "ssim": ssim_metric, "ms_ssim": ms_ssim_metric}


def compare_images(
    kind: str, path_a: str, path_b: str, *, data_range: float = 255.0, batch_size: int = 64
) -> dict:
    """`kind` ("psnr", "ssim" or "ms_ssim") between two folders (paired by sorted name) or
    two image files, read as float32 RGB in [0, 255].

    Returns {"metric", "value" (mean over images), "count", "per_image", "data_range"}.
    """
    if kind not in METRICS:
        raise ValueError(f"unknown pixel metric {kind!r}; choose from {', '.join(METRICS)}")
    if not data_range > 0:
        raise UserError(f"the data range must be positive, got {data_range}")
    files_a, files_b = image_io.paired_images(path_a, path_b)
    metric = METRICS[kind](data_range)
    per_image = jax.jit(functools.partial(PER_IMAGE[kind], data_range=data_range))

    @jax.jit
    def step(state, a, b):
        # XLA's common-subexpression pass computes the per-image values once for both.
        return metric.update(state, a, b), per_image(a, b)

    state = metric.init()
    values: list[float] = []
    batches = zip(
        image_io.image_batches(files_a, batch_size),
        image_io.image_batches(files_b, batch_size),
        strict=True,
    )
    for start, (a, b) in zip(range(0, len(files_a), batch_size), batches, strict=True):
        if a.shape != b.shape:
            raise DataError(
                f"images differ in size: {files_a[start]} is {a.shape[2]}x{a.shape[1]}, "
                f"{files_b[start]} is {b.shape[2]}x{b.shape[1]}"
            )
        try:
            state, batch_values = step(state, a.astype(np.float32), b.astype(np.float32))
        except ValueError as e:  # images too small for the window: the user's data
            raise DataError(f"{kind} of {files_a[start]}: {e}") from None
        values.extend(np.asarray(batch_values, np.float64).tolist())
    return {
        "metric": kind,
        "value": float(metric.compute(state)),
        "count": len(values),
        "per_image": values,
        "data_range": data_range,
    }
