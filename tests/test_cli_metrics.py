"""`t2i metrics ...` as a user runs it: folders of PNG files, separate processes."""

import json

import numpy as np
import pytest
import skimage.data
import skimage.metrics
from helpers import run_cli
from PIL import Image


def _photos(size: int = 48) -> np.ndarray:
    """Four of scikit-image's photographs, centre-cropped and resized: uint8 [4, s, s, 3]."""
    out = []
    for image in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()):
        h, w = image.shape[:2]
        side = min(h, w)
        crop = image[(h - side) // 2 :][:side, (w - side) // 2 :][:, :side]
        out.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)))
    out.append(np.asarray(Image.fromarray(out[0]).transpose(Image.FLIP_LEFT_RIGHT)))
    return np.stack(out)


def _write_folder(path, images: np.ndarray) -> None:
    path.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(path / f"{i:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    clean = _photos()
    noise = np.random.default_rng(0).normal(0, 12, clean.shape)
    noisy = np.clip(clean + noise, 0, 255).astype(np.uint8)
    _write_folder(root / "a", clean)
    _write_folder(root / "b", noisy)
    return root, clean, noisy


@pytest.mark.parametrize("metric", ["psnr", "ssim"])
def test_pixel_metric_of_two_folders_equals_skimage(folders, metric):
    root, clean, noisy = folders
    out = root / f"{metric}.json"
    result = run_cli("metrics", metric, str(root / "a"), str(root / "b"), "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{metric.upper()}: ")
    reported = json.loads(out.read_text())
    x, y = clean.astype(np.float64), noisy.astype(np.float64)
    pairs = list(zip(x, y, strict=True))
    if metric == "psnr":
        expected = [skimage.metrics.peak_signal_noise_ratio(a, b, data_range=255) for a, b in pairs]
    else:
        expected = [
            skimage.metrics.structural_similarity(
                a, b, gaussian_weights=True, use_sample_covariance=False, sigma=1.5,
                data_range=255, channel_axis=-1,
            )
            for a, b in pairs
        ]  # fmt: skip
    assert reported["count"] == 4
    # float32 (ours) against float64 (skimage) of the same formula.
    np.testing.assert_allclose(reported["per_image"], expected, rtol=1e-5)
    np.testing.assert_allclose(reported["value"], np.mean(expected), rtol=1e-5)


def test_single_images_can_be_compared(folders):
    root, clean, noisy = folders
    result = run_cli("metrics", "psnr", str(root / "a" / "001.png"), str(root / "b" / "001.png"))
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.split()[1])
    expected = skimage.metrics.peak_signal_noise_ratio(clean[1], noisy[1], data_range=255)
    assert value == pytest.approx(expected, rel=1e-5)


def test_bad_inputs_fail_with_one_line(folders, tmp_path):
    root, clean, _ = folders
    (tmp_path / "broken").mkdir()
    Image.fromarray(clean[0]).save(tmp_path / "broken" / "000.png")
    (tmp_path / "broken" / "001.png").write_bytes(b"not a png")
    wide = str(tmp_path / "wide.png")  # 16-bit: converting it to 8-bit would clip it
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(wide)
    cases = {
        ("metrics", "ssim", str(root / "a"), str(tmp_path / "missing")): "missing",
        ("metrics", "ssim", str(root / "a"), str(tmp_path / "broken")): "has 4 images but",
        ("metrics", "psnr", str(root / "a" / "000.png"), str(tmp_path / "broken" / "001.png")): (
            "cannot read image"
        ),
        ("metrics", "lpips", str(root / "a"), str(root / "b")): "--backbone-weights",
        ("metrics", "psnr", wide, wide): "16-bit",
        ("metrics", "psnr", str(root / "a"), str(root / "b"), "--json", "/nonexistent/x.json"): (
            "cannot write /nonexistent/x.json"
        ),
        (
            "metrics", "fid", str(root / "a"), str(root / "b"),
            "--inception-weights", str(tmp_path / "nope.pth"),
        ): "nope.pth",
        ("eval", "--workdir", str(tmp_path / "no_run")): "no_run",
    }  # fmt: skip
    for args, expected in cases.items():
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("t2i: error: "), (args, result.stderr)
        assert expected in lines[0], (args, lines[0])
