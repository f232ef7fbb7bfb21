"""FID as pytorch-fid computes it: FID Inception pool3 features, Gaussian statistics, distance.

Reference convention: pytorch-fid (`InceptionV3([3], resize_input=True,
normalize_input=True)` with `fid_inception_v3()` weights). Images in [0, 1] (uint8 / 255)
are resized to 299x299 bilinearly with align_corners=False and no antialiasing (what
`F.interpolate` does, also when downsampling), scaled to [-1, 1], and the 2048-d pool3
features stream into float64 (count, sum, sum of outer products), so any batching or
sharding gives the same statistics. The distance is `frechet.frechet_distance` (sqrtm of
S1 S2, eps retry, imaginary-part check; N - 1 covariance). Every result carries the sample
counts and a digest of each side's statistics, so a number can be traced to its reference.

The weights are pytorch-fid's release file, loaded without torch; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.batching import pad_to
from t2i_jax.errors import CheckpointError, MetricError
from t2i_jax.metrics import frechet, image_io
from t2i_jax.metrics.base import Metric, State
from t2i_jax.nets import inception as inception_net
from t2i_jax.nets.torch_weights import load_state_dict

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
)
INPUT_SIZE = 299
FEATURE_DIM = inception_net.POOL3_DIM


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resize along one axis (align_corners=False).

    As ATen's `area_pixel_compute_source_index` and `compute_source_index_and_lambda` in
    float32: src = max(scale * (dst + 0.5) - 0.5, 0), scale = in / out. The compiled kernel
    fuses that multiply-add (one rounding); rounding twice moves some weights by an ulp,
    which the network amplifies to ~1e-4 in pool3. The float64 product of two float32s is
    exact, so one rounding to float32 afterwards is the fused result.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam1


def resize_bilinear(images: jax.Array, height: int, width: int) -> jax.Array:
    """[B, H, W, C] -> [B, height, width, C] as `F.interpolate(mode="bilinear")`.

    No antialiasing in either direction (jax.image.resize would antialias a downsample);
    width is interpolated first, then height, as ATen's separable CPU kernel.
    """
    _, h, w, _ = images.shape
    if (h, w) == (height, width):
        return images  # scale 1: torch's taps are the identity
    x = images
    i0, i1, lam = _linear_taps(w, width)
    x = x[:, :, i0] * (1 - lam)[:, None] + x[:, :, i1] * lam[:, None]
    i0, i1, lam = _linear_taps(h, height)
    return x[:, i0] * (1 - lam)[:, None, None] + x[:, i1] * lam[:, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] (or float in [0, 1]) -> float32 [B, 299, 299, 3] in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0  # torchvision's ToTensor
    x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
    return 2 * x - 1


@jax.jit
def _features(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return inception_net.FIDInceptionV3().apply(variables, preprocess(images))


@dataclasses.dataclass(frozen=True, eq=False)
class FidInception:
    """The FID Inception's variables and where they came from (logged with every FID)."""

    variables: Any
    weights: str

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, H, W, 3] or float [0, 1] -> (pool3 float32 [B, 2048], logits [B, 1008]).

        jit-compiled once per input shape and dtype. Model samples in [-1, 1] must be mapped
        to [0, 1] first ((x + 1) / 2); a float batch outside [0, 1] is refused.
        """
        images = jnp.asarray(images)
        if jnp.issubdtype(images.dtype, jnp.floating) and (
            float(images.min()) < 0.0 or float(images.max()) > 1.0
        ):
            raise MetricError(
                "FID Inception takes uint8 images or floats in [0, 1]; got values in "
                f"[{float(images.min()):.3g}, {float(images.max()):.3g}]"
            )
        pool3, logits = _features(self.variables, images)
        return np.asarray(pool3), np.asarray(logits)


def default_weights_path() -> str:
    """Where torch hub (and so pytorch-fid) caches the weights: $TORCH_HOME/hub/checkpoints."""
    torch_home = os.environ.get(
        "TORCH_HOME",
        os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"),
    )
    return os.path.join(torch_home, "hub", "checkpoints", WEIGHTS_FILE)


def load_fid_inception(path: str | None = None, *, random_seed: int | None = None) -> FidInception:
    """pytorch-fid's FID Inception from its `.pth` (or a `.safetensors` conversion).

    `path=None` looks in the torch hub cache, where pytorch-fid puts its download.
    `random_seed` gives random weights instead (tests and benchmarks: not a metric).
    """
    if random_seed is not None:
        if path is not None:
            raise ValueError("pass either a weights path or random_seed, not both")
        variables = inception_net.random_variables(random_seed)
        return FidInception(jax.device_put(variables), f"random(seed={random_seed})")
    if path is None:
        path = default_weights_path()
        if not os.path.isfile(path):
            raise CheckpointError(
                f"FID Inception weights not found at {path}: pass the path of {WEIGHTS_FILE} "
                f"(pytorch-fid publishes it at {WEIGHTS_URL})"
            )
    state_dict = load_state_dict(path)
    variables = inception_net.convert_state_dict(state_dict, path)
    return FidInception(jax.device_put(variables), os.path.basename(path))


def _as_inception(inception: FidInception | str | None) -> FidInception:
    return inception if isinstance(inception, FidInception) else load_fid_inception(inception)


def inception_stats(inception: FidInception) -> Metric:
    """Streaming pool3 statistics of images: update(state, images uint8 [B, H, W, 3])."""
    gaussian = frechet.gaussian_stats(FEATURE_DIM)

    def update(state: State, images) -> State:
        return gaussian.update(state, inception(images)[0])

    return Metric(gaussian.init, update, gaussian.merge, gaussian.compute)


@dataclasses.dataclass(frozen=True)
class FidResult:
    """A FID with what it was computed from."""

    value: float
    count_a: int  # -1 where a side came from a pytorch-fid .npz, which records no count
    count_b: int
    digest_a: str
    digest_b: str
    weights: str
    path_a: str = ""  # what each side's statistics were computed from
    path_b: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fid_of_stats(a: frechet.GaussianStats, b: frechet.GaussianStats, weights: str) -> FidResult:
    """FID between two sets of statistics, with counts and digests."""
    value = frechet.frechet_distance(a, b)
    return FidResult(value, a.count, b.count, a.digest(), b.digest(), weights)


def stats_of_path(
    path: str, inception: FidInception | str | None = None, *, batch_size: int = 50
) -> frechet.GaussianStats:
    """Statistics of a folder / image file, or the contents of a statistics `.npz`."""
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise CheckpointError(f"statistics file not found: {path}")
        try:
            return frechet.GaussianStats.load(path)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: not a statistics file with mu and sigma ({e})") from e
    metric = frechet.gaussian_stats(FEATURE_DIM)
    state = metric.init()
    for pool3, _ in _inception_batches(path, inception, batch_size):
        state = metric.update(state, pool3)
    return metric.compute(state)


def _inception_batches(
    path: str, inception: FidInception | str | None, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pool3, logits) of a folder's images (or one image file), batch by batch in file order."""
    inception = _as_inception(inception)
    paths = image_io.list_images(path)
    batch_size = min(batch_size, len(paths))  # as pytorch-fid
    for batch in image_io.image_batches(paths, batch_size):
        # The last batch repeats its last image: one input shape, one compilation.
        (batch,), n = pad_to([batch], batch_size, fill="edge")
        pool3, logits = inception(batch)
        yield pool3[:n], logits[:n]


def inception_outputs_of_path(
    path: str, inception: FidInception | str | None = None, *, batch_size: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Pool3 features float32 [N, 2048] and logits [N, 1008] of a folder's images (or one
    image file), in file order: the inputs of KID and precision/recall (pool3) and IS (logits).

    The folder is read as `stats_of_path` reads it (sorted, as pytorch-fid); unlike the
    statistics, every image's features are kept (8 KiB of pool3, 4 KiB of logits each).
    """
    pools, logits = zip(*_inception_batches(path, inception, batch_size), strict=True)
    return np.concatenate(pools), np.concatenate(logits)


def fid_of_paths(
    path_a: str,
    path_b: str,
    *,
    inception_weights: FidInception | str | None = None,
    batch_size: int = 50,
) -> FidResult:
    """FID between two folders / images / `.npz` statistics, like pytorch-fid's command."""
    for path in (path_a, path_b):  # the inputs first, before the network is read
        if not path.endswith(".npz"):
            image_io.list_images(path)
    needs_network = not (path_a.endswith(".npz") and path_b.endswith(".npz"))
    inception = _as_inception(inception_weights) if needs_network else None
    a = stats_of_path(path_a, inception, batch_size=batch_size)
    b = stats_of_path(path_b, inception, batch_size=batch_size)
    weights = inception.weights if inception is not None else "(precomputed statistics)"
    return dataclasses.replace(fid_of_stats(a, b, weights), path_a=path_a, path_b=path_b)


def save_stats(
    path_in: str,
    out_npz: str,
    *,
    inception_weights: FidInception | str | None = None,
    batch_size: int = 50,
) -> frechet.GaussianStats:
    """pytorch-fid's `--save-stats`: writes mu, sigma (and the count) of a folder to `.npz`."""
    stats = stats_of_path(path_in, _as_inception(inception_weights), batch_size=batch_size)
    stats.save(out_npz)
    return stats
