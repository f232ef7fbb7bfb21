"""`t2i metrics ...` as a user runs it: folders of PNG files, separate processes.

The Inception commands (kid, is, pr) run in this process (`cli.main`), as test_fid.py's FID
command does, so the network compiles once for all of them; their weights are random, in
a `.safetensors` file with pytorch-fid's tensor names.
"""

import json
import warnings

import numpy as np
import pytest
import skimage.data
import skimage.metrics
from helpers import INCEPTION_SEED, run_cli
from PIL import Image

from t2i_jax import cli
from t2i_jax.metrics import fid, inception_score, kid, precision_recall


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


INCEPTION_BATCH = 3  # divides neither folder's count: the padded last batch is exercised


@pytest.fixture(scope="module")
def inception_folders(tmp_path_factory):
    """Real (6 photos) and fake (5 noisy photos) folders and each one's (pool3, logits),
    computed here from the image arrays by the random-weight network itself."""
    root = tmp_path_factory.mktemp("inception_metrics")
    photos = _photos()
    real = np.concatenate([photos, photos[:2, ::-1]])  # 6: two upside down
    noise = np.random.default_rng(1).normal(0, 40, (5, *photos.shape[1:]))
    fake = np.clip(np.concatenate([photos, photos[2:3, :, ::-1]]) + noise, 0, 255).astype(np.uint8)
    _write_folder(root / "real", real)
    _write_folder(root / "fake", fake)
    inception = fid.load_fid_inception(random_seed=INCEPTION_SEED)

    def outputs(images):
        # In batches of INCEPTION_BATCH, the last one repeating its last image: the shapes
        # the command runs, so the network compiles once.
        pools, logits = [], []
        for start in range(0, len(images), INCEPTION_BATCH):
            batch = images[start : start + INCEPTION_BATCH]
            n = len(batch)
            batch = np.concatenate([batch, np.repeat(batch[-1:], INCEPTION_BATCH - n, axis=0)])
            pool3, logit = inception(batch)
            pools.append(pool3[:n])
            logits.append(logit[:n])
        return np.concatenate(pools), np.concatenate(logits)

    return {
        "real": str(root / "real"),
        "fake": str(root / "fake"),
        "real_outputs": outputs(real),
        "fake_outputs": outputs(fake),
    }


def _inception_command(capsys, tmp_path, inception_weights, *args: str) -> tuple[str, dict]:
    """Runs `t2i metrics ARGS --inception-weights W --batch-size 3 --json F` in-process."""
    out = tmp_path / "result.json"
    code = cli.main(
        [
            "metrics",
            *args,
            "--inception-weights",
            inception_weights,
            "--batch-size",
            str(INCEPTION_BATCH),
            "--json",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured.out
    return lines[0], json.loads(out.read_text())


def test_inception_outputs_of_a_folder_are_the_networks_on_its_images(
    inception_weights, inception_folders
):
    inception = fid.load_fid_inception(inception_weights)  # the file holds seed 0's weights
    for side in ("real", "fake"):
        pool3, logits = fid.inception_outputs_of_path(
            inception_folders[side], inception, batch_size=INCEPTION_BATCH
        )
        expected_pool3, expected_logits = inception_folders[f"{side}_outputs"]
        assert pool3.shape == (len(expected_pool3), 2048) and logits.shape[1] == 1008
        np.testing.assert_array_equal(pool3, expected_pool3)
        np.testing.assert_array_equal(logits, expected_logits)
        assert pool3.std(axis=0).max() > 0  # the images are told apart


def test_kid_command(capsys, tmp_path, inception_weights, inception_folders):
    real, fake = inception_folders["real"], inception_folders["fake"]
    line, reported = _inception_command(
        capsys, tmp_path, inception_weights, "kid", real, fake,
        "--subsets", "7", "--subset-size", "50", "--seed", "5",
    )  # fmt: skip
    real_pool3, fake_pool3 = (
        inception_folders["real_outputs"][0],
        inception_folders["fake_outputs"][0],
    )
    mean, std = kid.kernel_inception_distance(
        real_pool3, fake_pool3, seed=5, subsets=7, subset_size=5
    )
    assert reported == {
        "metric": "kid",
        "value": pytest.approx(mean, rel=1e-9),
        "std": pytest.approx(std, rel=1e-9),
        "count_a": 6,
        "count_b": 5,
        "subsets": 7,
        "subset_size": 5,
        "subset_size_requested": 50,
        "seed": 5,
        "weights": "fid_random.safetensors",
        "path_a": real,
        "path_b": fake,
    }
    assert std > 0  # the 6 real images give different subsets of 5
    # The options reach the function: other seeds, or the sides swapped, give other draws.
    assert mean != kid.kernel_inception_distance(real_pool3, fake_pool3, seed=0, subsets=7)[0]
    assert mean != kid.kernel_inception_distance(fake_pool3, real_pool3, seed=5, subsets=7)[0]
    assert line.startswith(f"KID: {mean:.6g} (std ")
    assert "6 vs 5 images; 7 subsets of 5, --subset-size 50 capped" in line


def test_is_command(capsys, tmp_path, inception_weights, inception_folders):
    real = inception_folders["real"]
    logits = inception_folders["real_outputs"][1]
    args = ("is", real, "--splits", "4", "--seed", "2")
    line, reported = _inception_command(capsys, tmp_path, inception_weights, *args)
    mean, std = inception_score.inception_score(logits, seed=2, splits=4)
    assert reported == {
        "metric": "is",
        "value": pytest.approx(mean, rel=1e-12),
        "std": pytest.approx(std, rel=1e-12),
        "count": 6,
        "splits": 4,
        "splits_made": 3,  # torch.chunk cuts 6 rows into 3 chunks of 2
        "seed": 2,
        "weights": "fid_random.safetensors",
        "path": real,
    }
    assert mean != inception_score.inception_score(logits, seed=0, splits=4)[0]
    assert line.startswith(f"IS: {mean:.6f} (std ")
    assert "(6 images; 4 splits (3 made, as torch.chunk cuts 6); seed 2)" in line
    # One split has no spread: no std (rather than numpy's warning and nan).
    line, reported = _inception_command(
        capsys, tmp_path, inception_weights, "is", real, "--splits", "1"
    )
    assert reported["std"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the std of one split
        expected = inception_score.inception_score(logits, seed=None, splits=1)[0]
    assert reported["value"] == pytest.approx(expected, rel=1e-12)
    assert "one split, no std" in line


def test_pr_command(capsys, tmp_path, inception_weights, inception_folders):
    real, fake = inception_folders["real"], inception_folders["fake"]
    line, reported = _inception_command(
        capsys, tmp_path, inception_weights, "pr", real, fake, "--k", "2"
    )
    real_pool3, fake_pool3 = (
        inception_folders["real_outputs"][0],
        inception_folders["fake_outputs"][0],
    )
    precision, recall = precision_recall.precision_recall(real_pool3, fake_pool3, k=2)
    assert reported == {
        "metric": "pr",
        "precision": precision,
        "recall": recall,
        "count_real": 6,
        "count_fake": 5,
        "k": 2,
        "weights": "fid_random.safetensors",
        "path_real": real,
        "path_fake": fake,
    }
    assert line == (
        f"precision: {precision:.6f}  recall: {recall:.6f}  (6 real vs 5 generated images; k 2)"
    )


def test_inception_commands_bad_inputs_fail_with_one_line(
    capsys, tmp_path, inception_weights, folders, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no weights in the cache
    real = str(folders[0] / "a")  # 4 images
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    for i in range(4):
        (tmp_path / "broken" / f"{i:03d}.png").write_bytes(b"not a png")
    weights = ("--inception-weights", inception_weights)
    cases = {
        ("kid", real, str(tmp_path / "empty"), *weights): "no images",
        ("is", str(tmp_path / "missing"), *weights): "no such image file or folder",
        ("is", real, *weights): "IS with --splits 10 needs at least 10 images",
        ("pr", str(tmp_path / "broken"), real, *weights): "cannot read image",
        ("pr", real, f"{real}/000.png", *weights): "needs at least 4 images on each side",
        ("pr", real, real, "--inception-weights", str(tmp_path / "nope.pth")): "nope.pth",
        ("is", real, "--splits", "2"): "FID Inception weights not found",
        ("kid", real, real, "--subset-size", "1", *weights): "--subset-size must be at least 2",
    }
    for args, expected in cases.items():
        code = cli.main(["metrics", *args])
        captured = capsys.readouterr()
        assert code == 2, (args, captured.err)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("t2i: error: "), (args, captured.err)
        assert expected in lines[0], (args, lines[0])
