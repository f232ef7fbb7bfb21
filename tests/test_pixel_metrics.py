"""PSNR, SSIM and MS-SSIM against scikit-image, pytorch-msssim and a float64 numpy SSIM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_msssim import ms_ssim as torch_ms_ssim
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from t2i_jax.errors import DataError, UserError
from t2i_jax.metrics import pixel

# float32 against float64 of the same formula: float32 rounding of sums of ~10^4 terms.
RTOL = 1e-5


def _crop(image: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return image[top : top + h, left : left + w]


def _photo_pairs(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centre crops of four bundled photos and distorted copies, float32 [4, h, w, 3] in
    [0, 255]: Gaussian noise of growing strength, one also darkened and lower in contrast."""
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    x = np.stack([_crop(p, h, w) for p in photos]).astype(np.float64)
    rng = np.random.default_rng(seed)
    sigmas = np.array([3.0, 10.0, 25.0, 60.0]).reshape(-1, 1, 1, 1)
    y = x + sigmas * rng.standard_normal(x.shape)
    y[1] = 0.8 * y[1] + 10.0
    return x.astype(np.float32), np.clip(y, 0, 255).astype(np.float32)


@pytest.fixture(scope="module")
def photos128():
    return _photo_pairs(128, 128)


@pytest.fixture(scope="module")
def photos_odd():
    """Large enough for MS-SSIM. The sides pass through odd and even sizes (165, 83, 42, 21,
    11 and 171, 86, 43, 22, 11), so the pooling is tested with and without its padding.
    MS-SSIM tests share these shapes so they reuse a few compilations (the run time)."""
    return _photo_pairs(165, 171, seed=2)


def _numpy_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """tf.image.ssim's formula in float64 with a 2-D (not separable) 11x11 Gaussian window."""
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    g /= g.sum()
    kernel = np.outer(g, g)

    def filt(a):  # VALID correlation over H, W of [B, H, W, C]
        windows = np.lib.stride_tricks.sliding_window_view(a, (11, 11), axis=(1, 2))
        return np.einsum("bhwcij,ij->bhwc", windows, kernel)

    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * (2 * cxy + c2) / (vx + vy + c2)
    return s.mean(axis=(1, 2, 3))


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_ssim_matches_float64_tf_formula(photos128):
    x, y = photos128
    got = pixel.ssim(x, y, data_range=255.0)
    want = _numpy_ssim(x, y, 255.0)
    assert got.shape == (4,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # The distortions span a wide range of SSIM, so the comparison covers more than ~1.
    assert want.max() > 0.9 and want.min() < 0.3


def test_ssim_matches_skimage(photos128):
    x, y = photos128
    got = pixel.ssim(x, y, data_range=255.0)
    for i in range(len(x)):
        want = structural_similarity(
            x[i].astype(np.float64),
            y[i].astype(np.float64),
            gaussian_weights=True,
            use_sample_covariance=False,
            sigma=1.5,
            data_range=255,
            channel_axis=-1,
        )
        np.testing.assert_allclose(got[i], want, rtol=RTOL)


def test_ssim_one_channel_matches_skimage():
    x = _crop(skdata.camera(), 96, 80).astype(np.float64)
    y = np.clip(x + 15 * np.random.default_rng(1).standard_normal(x.shape), 0, 255)
    got = pixel.ssim(x[None, ..., None].astype(np.float32), y[None, ..., None], data_range=255)
    want = structural_similarity(
        x, y, gaussian_weights=True, use_sample_covariance=False, sigma=1.5, data_range=255
    )
    np.testing.assert_allclose(got, [want], rtol=RTOL)


def test_ssim_data_range_scales_with_images(photos128):
    x, y = photos128
    np.testing.assert_allclose(
        pixel.ssim(x / 255, y / 255, data_range=1.0), pixel.ssim(x, y, data_range=255.0), rtol=RTOL
    )


def test_psnr_matches_skimage(photos128):
    x, y = photos128
    got = pixel.psnr(x, y, data_range=255.0)
    want = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_psnr_of_identical_images_is_inf(photos128):
    x, y = photos128
    got = pixel.psnr(np.concatenate([x[:1], x[:1]]), np.concatenate([x[:1], y[:1]]), data_range=255)
    assert got[0] == np.inf and np.isfinite(got[1])


def test_psnr_metric_with_identical_pairs_is_inf(photos128):
    x, y = photos128
    metric = pixel.psnr_metric(255.0)
    finite = metric.update(metric.init(), x[:2], y[:2])
    np.testing.assert_allclose(
        metric.compute(finite), np.mean(pixel.psnr(x[:2], y[:2], data_range=255.0)), rtol=1e-6
    )
    with_identical = metric.update(finite, x[2:], x[2:])
    # Streaming on after an infinite value and merging keep the value +inf, not NaN.
    state = metric.merge(metric.update(with_identical, x[:2], y[:2]), finite)
    assert int(state["count"]) == 8 and np.isfinite(state["compensation"])
    assert metric.compute(state) == np.inf


def test_ssim_of_identical_images_is_one(photos128):
    x, _ = photos128
    np.testing.assert_allclose(pixel.ssim(x, x, data_range=255.0), 1.0, rtol=1e-6)


def _torch_ms_ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    def nchw(a):
        return torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2)

    return torch_ms_ssim(nchw(x), nchw(y), data_range=255, size_average=False).numpy()


def test_ms_ssim_matches_pytorch_msssim(photos_odd):
    x, y = photos_odd
    want = _torch_ms_ssim(x, y)
    np.testing.assert_allclose(pixel.ms_ssim(x, y, data_range=255.0), want, rtol=RTOL)
    assert want.max() > 0.9 and want.min() < 0.6


def test_ms_ssim_rejects_small_images():
    x = np.zeros((1, 160, 300, 3), np.float32)
    with pytest.raises(ValueError, match="at least 161x161"):
        pixel.ms_ssim(x, x, data_range=255.0)


def test_ssim_rejects_mismatched_and_small_images():
    with pytest.raises(ValueError, match="differ in shape"):
        pixel.ssim(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 17, 3)), data_range=1.0)
    with pytest.raises(ValueError, match="smaller than"):
        pixel.ssim(np.zeros((1, 10, 16, 3)), np.zeros((1, 10, 16, 3)), data_range=1.0)


def test_functions_work_under_jit(photos128, photos_odd):
    x, y = photos128
    for fn in (pixel.psnr, pixel.ssim):
        eager = fn(x, y, data_range=255.0)
        jitted = jax.jit(functools.partial(fn, data_range=255.0))(x, y)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    # data_range may itself be traced.
    traced = jax.jit(lambda a, b, r: pixel.ssim(a, b, data_range=r))(x, y, 255.0)
    np.testing.assert_allclose(traced, pixel.ssim(x, y, data_range=255.0), rtol=1e-6)
    big_x, big_y = photos_odd
    ms = jax.jit(functools.partial(pixel.ms_ssim, data_range=255.0))(big_x, big_y)
    np.testing.assert_allclose(ms, pixel.ms_ssim(big_x, big_y, data_range=255.0), rtol=1e-6)


@pytest.mark.parametrize(
    "make_metric, fn",
    [(pixel.psnr_metric, pixel.psnr), (pixel.ssim_metric, pixel.ssim)],
)
def test_streaming_merge_equals_one_pass(make_metric, fn):
    x, y = _photo_pairs(48, 64, seed=4)
    x, y = np.concatenate([x, x[:, ::-1]]), np.concatenate([y, y[:, ::-1]])  # 8 images
    metric = make_metric(255.0)
    one_pass = metric.compute(metric.update(metric.init(), x, y))
    # Shards of 3, 1 and 4 images, each streamed in its own batches, then merged.
    shard_states = []
    for lo, hi in [(0, 3), (3, 4), (4, 8)]:
        state = metric.init()
        for start in range(lo, hi, 2):
            state = metric.update(
                state, x[start : min(start + 2, hi)], y[start : min(start + 2, hi)]
            )
        shard_states.append(state)
    merged = functools.reduce(metric.merge, shard_states)
    count = merged["finite"]["count"] if "finite" in merged else merged["count"]
    assert int(count) == 8
    # float32 sums of 8 values in different orders: a few ulps apart, hence 1e-6, not 0.
    np.testing.assert_allclose(metric.compute(merged), one_pass, rtol=1e-6)
    np.testing.assert_allclose(
        one_pass, np.mean(np.asarray(fn(x, y, data_range=255.0), np.float64)), rtol=1e-6
    )
    # The batch split over the 8 devices, update jit-compiled: the same state.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.jit(metric.update)(metric.init(), *jax.device_put((x, y), sharding))
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(metric.compute(sharded), one_pass, rtol=1e-6)


def test_ms_ssim_metric_is_mean_of_per_image(photos_odd):
    x, y = photos_odd
    metric = pixel.ms_ssim_metric(255.0)
    state = metric.merge(metric.update(metric.init(), x[:2], y[:2]), metric.init())
    state = metric.update(state, x[2:], y[2:])
    per_image = np.asarray(pixel.ms_ssim(x, y, data_range=255.0), np.float64)
    np.testing.assert_allclose(metric.compute(state), per_image.mean(), rtol=1e-6)


def _write_pngs(folder, images: np.ndarray) -> None:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")


@pytest.fixture
def png_folders(tmp_path):
    x, y = _photo_pairs(40, 48, seed=6)
    a, b = np.round(x).astype(np.uint8)[:3], np.round(y).astype(np.uint8)[:3]
    _write_pngs(tmp_path / "a", a)
    _write_pngs(tmp_path / "b", b)
    return tmp_path, a, b


@pytest.mark.parametrize("kind", ["psnr", "ssim"])
def test_compare_images_equals_function_on_arrays(png_folders, kind):
    root, a, b = png_folders
    result = pixel.compare_images(kind, str(root / "a"), str(root / "b"), batch_size=2)
    want = pixel.PER_IMAGE[kind](a.astype(np.float32), b.astype(np.float32), data_range=255.0)
    assert result["metric"] == kind and result["count"] == 3 and result["data_range"] == 255.0
    np.testing.assert_allclose(result["per_image"], want, rtol=1e-6)
    np.testing.assert_allclose(result["value"], np.mean(np.asarray(want, np.float64)), rtol=1e-6)
    single = pixel.compare_images(kind, str(root / "a" / "001.png"), str(root / "b" / "001.png"))
    assert single["count"] == 1
    np.testing.assert_allclose(single["value"], want[1], rtol=1e-6)


def test_compare_images_ms_ssim_on_files(tmp_path, photos_odd):
    a, b = (np.round(p).astype(np.uint8) for p in photos_odd)
    _write_pngs(tmp_path / "a", a)
    _write_pngs(tmp_path / "b", b)
    result = pixel.compare_images("ms_ssim", str(tmp_path / "a"), str(tmp_path / "b"))
    assert result["count"] == 4
    want = pixel.ms_ssim(a.astype(np.float32), b.astype(np.float32), data_range=255.0)
    np.testing.assert_allclose(result["per_image"], want, rtol=1e-6)


def test_compare_images_errors(png_folders):
    root, a, _ = png_folders
    (root / "b" / "002.png").unlink()
    with pytest.raises(DataError, match="has 3 images but"):
        pixel.compare_images("psnr", str(root / "a"), str(root / "b"))
    (root / "b" / "002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        pixel.compare_images("psnr", str(root / "a"), str(root / "b"))
    Image.fromarray(a[2, :32]).save(root / "b" / "002.png")
    with pytest.raises(DataError, match="differ in size"):
        pixel.compare_images("psnr", str(root / "a"), str(root / "b"), batch_size=1)
    with pytest.raises(DataError, match="at least 161x161"):
        pixel.compare_images("ms_ssim", str(root / "a"), str(root / "a"))


def test_compare_images_of_a_folder_with_itself(png_folders):
    root, _, _ = png_folders
    psnr = pixel.compare_images("psnr", str(root / "a"), str(root / "a"))
    assert psnr["value"] == np.inf and psnr["per_image"] == [np.inf] * 3
    ssim = pixel.compare_images("ssim", str(root / "a"), str(root / "a"))
    np.testing.assert_allclose(ssim["per_image"], 1.0, rtol=1e-6)
    with pytest.raises(UserError, match="data range must be positive"):
        pixel.compare_images("ssim", str(root / "a"), str(root / "a"), data_range=0.0)


def test_psnr_of_16_bit_values_with_an_integer_data_range():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65536, (2, 16, 16, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 500, x.shape), 0, 65535).astype(np.float32)
    # An int data_range squared in int32 would overflow (65535^2 > 2^31).
    expected = [peak_signal_noise_ratio(a, b, data_range=65535) for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(pixel.psnr(x, y, data_range=65535), expected, rtol=1e-5)
