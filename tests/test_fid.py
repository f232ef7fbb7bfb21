"""FID Inception and FID against pytorch-fid, with random weights copied into both.

pytorch-fid's network is built from its own code (`fid_inception_v3`, `InceptionV3`) with the
weight download skipped; its BatchNorm statistics are set by one train-mode pass over
images (so every layer is centred and the features depend on the input), then its state
dict is saved as a `.pth` and read by our loader, as a user's weight file would be.
"""

import copy
import json
import os

import jax
import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image
from pytorch_fid import fid_score
from pytorch_fid import inception as pfi

from t2i_jax import cli
from t2i_jax.errors import CheckpointError, MetricError
from t2i_jax.metrics import fid, frechet
from t2i_jax.nets import inception as inception_net
from t2i_jax.nets.torch_weights import load_state_dict

SIZE = 48  # of the small images (upsampled to 299); one compiled shape serves several tests
BATCH = 4
# Relative to the largest feature. float32 through ~95 layers, convolutions summing up to
# 2048 x 9 products in another order than torch's; the calibrated network amplifies
# rounding: measured ours vs pytorch-fid 3.5e-5 on photos, and 5.6e-5 in one of 8,192
# pool3 values on another run of the same test (a different CPU's kernels), while
# pytorch-fid's own float32 run is 1.1e-4 off its float64 run (see
# test_feature_differences_are_float32_rounding): the bound is that float32 rounding.
FEATURE_TOL = 1e-4


def _photos(size: int, count: int, offset: int = 0) -> np.ndarray:
    """Real photographs (scikit-image's), cropped to size x size at varying places."""
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    out = []
    for i in range(count):
        photo = photos[(i + offset) % len(photos)]
        y, x = 37 * (i + offset) % 100, 53 * (i + offset) % 150
        crop = photo[y : y + 4 * size : 4, x : x + 4 * size : 4]
        out.append(crop)
    return np.stack(out).astype(np.uint8)


def _torch_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # as ToTensor


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(fid_inception_v3 module, InceptionV3 wrapper, .pth path, legacy .pth path)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda *a, **k: None)
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: {})
    try:
        net = pfi.fid_inception_v3()
    finally:
        mp.undo()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5
                )
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.reset_running_stats()
                m.momentum = None  # cumulative: the statistics of the calibration batch
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    mp.setattr(pfi, "fid_inception_v3", lambda: net)
    try:
        wrapper = pfi.InceptionV3([3], resize_input=True, normalize_input=True)
    finally:
        mp.undo()
    noise = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    wrapper.train()
    with torch.no_grad():
        wrapper(_torch_input(np.concatenate([_photos(SIZE, 5, offset=7), noise])))
    wrapper.eval()
    net.eval()
    root = tmp_path_factory.mktemp("weights")
    path, legacy = str(root / "fid.pth"), str(root / "fid_legacy.pth")
    torch.save(net.state_dict(), path)
    torch.save(net.state_dict(), legacy, _use_new_zipfile_serialization=False)
    return net, wrapper, path, legacy


@pytest.fixture(scope="module")
def ours(reference):
    return fid.load_fid_inception(reference[2])


def _torch_features(reference, images):
    net, wrapper, *_ = reference
    with torch.no_grad():
        pool3 = wrapper(_torch_input(images))[0].flatten(1)
        return pool3.numpy(), net.fc(pool3).numpy()


def test_both_torch_formats_and_safetensors_convert_to_the_same_variables(reference, tmp_path):
    from safetensors.torch import save_file

    net, _, path, legacy = reference
    converted = str(tmp_path / "fid.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, converted)
    trees = [fid.load_fid_inception(p).variables for p in (path, legacy, converted)]
    for tree in trees[1:]:
        for a, b in zip(_leaves(trees[0]), _leaves(tree), strict=True):
            np.testing.assert_array_equal(a, b)
    # The conversion itself: OIHW -> HWIO, BN statistics into batch_stats.
    variables = trees[0]
    w = net.Mixed_6b.branch7x7_2.conv.weight.detach().numpy()  # a (1, 7) kernel
    np.testing.assert_array_equal(
        variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"], w.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
        net.Mixed_7c.branch_pool.bn.running_var.numpy(),
    )


def _leaves(tree):
    return (np.asarray(x) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "images",
    [
        pytest.param(_photos(SIZE, BATCH), id="upsample-photos-48"),
        pytest.param(
            np.random.default_rng(1).integers(0, 256, (BATCH, 360, 420, 3), dtype=np.uint8),
            id="downsample-noise-360x420",
        ),
    ],
)
def test_pool3_and_logits_match_pytorch_fid(reference, ours, images):
    pool3_ref, logits_ref = _torch_features(reference, images)
    pool3, logits = ours(images)
    assert pool3.shape == (BATCH, 2048) and logits.shape == (BATCH, 1008)
    assert pool3.dtype == np.float32
    # The comparison means something: features differ between images far beyond tolerance.
    scale = np.abs(pool3_ref).max()
    assert np.abs(pool3_ref - pool3_ref.mean(0)).max() > 100 * FEATURE_TOL * scale
    np.testing.assert_allclose(pool3, pool3_ref, rtol=1e-5, atol=FEATURE_TOL * scale)
    scale = np.abs(logits_ref).max()
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=FEATURE_TOL * scale)


def test_feature_differences_are_float32_rounding(reference, ours):
    """Against pytorch-fid in float64, ours is as close as pytorch-fid's own float32 run."""
    images = _photos(SIZE, BATCH)
    net64, wrapper64 = copy.deepcopy(reference[0]).double(), copy.deepcopy(reference[1]).double()
    with torch.no_grad():
        exact = wrapper64(_torch_input(images).double())[0].flatten(1)
        exact_logits = net64.fc(exact).numpy()
    exact = exact.numpy()
    torch32 = _torch_features(reference, images)
    pool3, logits = ours(images)
    for x, x32, x64 in ((pool3, torch32[0], exact), (logits, torch32[1], exact_logits)):
        torch_error = np.abs(x32 - x64).max()
        assert torch_error > 0
        assert np.abs(x - x64).max() < 1.5 * torch_error


@pytest.mark.parametrize("shape", [(17, 23), (48, 48), (299, 299), (360, 420), (600, 301)])
def test_resize_is_torch_bilinear_without_antialias(shape):
    x = np.random.default_rng(0).random((2, *shape, 3), dtype=np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )
    ours = np.asarray(fid.resize_bilinear(x, 299, 299))
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    images = {"a": _photos(SIZE, 10), "b": _photos(SIZE, 12, offset=20)}
    images["b"][::2] = 255 - images["b"][::2]  # a visibly different distribution
    for name, batch in images.items():
        os.makedirs(root / name)
        for i, image in enumerate(batch):
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
    return {name: str(root / name) for name in images}


@pytest.fixture(scope="module")
def pytorch_fid_stats(reference, folders) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """pytorch-fid's (mu, sigma) of each folder, as `calculate_fid_given_paths` computes
    them: `compute_statistics_of_path` with its `InceptionV3` wrapper (reference[1])."""
    return {
        name: fid_score.compute_statistics_of_path(
            folder, reference[1], BATCH, 2048, "cpu", num_workers=0
        )
        for name, folder in folders.items()
    }


def test_folder_statistics_match_pytorch_fid(ours, folders, pytorch_fid_stats, tmp_path):
    for name, count in (("a", 10), ("b", 12)):
        folder, (mu_ref, sigma_ref) = folders[name], pytorch_fid_stats[name]
        # BATCH does not divide the counts: the last, padded batch is exercised.
        stats = fid.stats_of_path(folder, ours, batch_size=BATCH)
        assert stats.count == count
        # Features agree to FEATURE_TOL (see above); sigma is of their products.
        scale = np.abs(mu_ref).max()
        np.testing.assert_allclose(stats.mu, mu_ref, rtol=1e-5, atol=FEATURE_TOL * scale)
        scale = np.abs(sigma_ref).max()
        np.testing.assert_allclose(stats.sigma, sigma_ref, rtol=1e-4, atol=2 * FEATURE_TOL * scale)
    saved = fid.save_stats(folders["a"], str(tmp_path / "a.npz"), inception_weights=ours)
    loaded = frechet.GaussianStats.load(str(tmp_path / "a.npz"))
    assert loaded.digest() == saved.digest() and loaded.count == 10


def test_fid_of_npz_statistics_matches_pytorch_fid_command(reference, tmp_path, monkeypatch):
    # pytorch-fid's .npz holds only mu and sigma; 64-d keeps sqrtm fast and well posed.
    rng = np.random.default_rng(3)
    paths = []
    for i, shift in enumerate((0.0, 0.3)):
        x = rng.normal(shift, 1.0, (200, 64)) @ rng.normal(size=(64, 64)) / 8
        path = str(tmp_path / f"{i}.npz")
        np.savez_compressed(path, mu=x.mean(0), sigma=np.cov(x, rowvar=False))
        paths.append(path)
    monkeypatch.setattr(pfi, "fid_inception_v3", lambda: reference[0])  # no download
    expected = fid_score.calculate_fid_given_paths(paths, 2, "cpu", 2048, num_workers=0)
    result = fid.fid_of_paths(*paths)
    assert result.value == pytest.approx(expected, rel=1e-12)
    d = result.to_dict()
    assert d["count_a"] == d["count_b"] == -1 and d["digest_a"] != d["digest_b"]
    assert set(d) == {
        "value",
        "count_a",
        "count_b",
        "digest_a",
        "digest_b",
        "weights",
        "path_a",
        "path_b",
    }
    assert (d["path_a"], d["path_b"]) == tuple(paths)


def test_fid_command_on_two_folders_gives_pytorch_fids_number(
    reference, folders, pytorch_fid_stats, tmp_path, capsys
):
    """`t2i metrics fid A B --inception-weights W` against pytorch-fid with the same weights.
    In this process (`cli.main`), so the Inception network compiled for the tests above is
    reused; test_cli_metrics.py runs the metrics commands as processes. pytorch-fid's number
    is `calculate_fid_given_paths`'s: the Frechet distance of each folder's statistics."""
    out = tmp_path / "fid.json"
    args = ["metrics", "fid", folders["a"], folders["b"], "--inception-weights", reference[2]]
    assert cli.main([*args, "--batch-size", str(BATCH), "--json", str(out)]) == 0
    assert capsys.readouterr().out.startswith("FID: ")
    reported = json.loads(out.read_text())
    expected = fid_score.calculate_frechet_distance(
        *pytorch_fid_stats["a"], *pytorch_fid_stats["b"]
    )
    assert (reported["count_a"], reported["count_b"]) == (10, 12)
    assert reported["weights"] == os.path.basename(reference[2])
    assert reported["value"] == pytest.approx(expected, rel=1e-5)  # measured 9e-7


def test_frechet_distance_matches_pytorch_fid_and_the_closed_form():
    rng = np.random.default_rng(0)
    a = frechet.stats_of(rng.normal(0, 1, (300, 32)))
    b = frechet.stats_of(rng.normal(0.2, 1.5, (250, 32)) @ rng.normal(size=(32, 32)) / 6)
    expected = fid_score.calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert frechet.frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)).
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    value = frechet.frechet_distance(
        frechet.GaussianStats(mu1, np.diag(s1), 2), frechet.GaussianStats(mu2, np.diag(s2), 2)
    )
    assert value == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_retries_with_eps_and_refuses_imaginary_roots():
    # sigma1 @ sigma2 = [[0, 1], [0, 0]] has no square root: sqrtm gives inf, so both
    # implementations retry with 1e-6 * I added to each covariance (and the large entry
    # makes that product's eigenvalues positive, so the retry succeeds).
    s1, s2 = np.diag([1.0, 0.0]), np.array([[0.0, 1.0], [1.0, 1e7]])
    mu = np.zeros(2)
    expected = fid_score.calculate_frechet_distance(mu, s1, mu, s2)
    value = frechet.frechet_distance(
        frechet.GaussianStats(mu, s1, 2), frechet.GaussianStats(mu, s2, 2)
    )
    assert np.isfinite(value) and value == pytest.approx(expected, rel=1e-12)
    eps = 1e-6 * np.eye(2)
    from scipy import linalg

    root = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    assert value == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real, rel=1e-9)
    # A product with negative eigenvalues has an imaginary root: an error, as in pytorch-fid.
    neg = frechet.GaussianStats(mu, -np.eye(2), 2)
    with pytest.raises(ValueError, match="(?i)imaginary component"):
        fid_score.calculate_frechet_distance(mu, np.eye(2), mu, -np.eye(2))
    with pytest.raises(ValueError, match="(?i)imaginary component"):
        frechet.frechet_distance(frechet.GaussianStats(mu, np.eye(2), 2), neg)


def test_streamed_statistics_merge_exactly():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (1000, 64))
    metric = frechet.gaussian_stats(64)
    one = metric.compute(metric.update(metric.init(), x))
    shards = [metric.update(metric.init(), s) for s in np.array_split(x, 7)]
    merged = shards[0]
    for shard in shards[1:]:
        merged = metric.merge(merged, shard)
    many = metric.compute(merged)
    assert many.count == one.count == 1000
    np.testing.assert_allclose(many.mu, one.mu, rtol=1e-12)
    np.testing.assert_allclose(many.sigma, one.sigma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_image_metric_streams_pool3_statistics(ours):
    images = _photos(SIZE, 2 * BATCH)
    metric = fid.inception_stats(ours)
    a = metric.update(metric.init(), images[:BATCH])
    b = metric.update(metric.init(), images[BATCH:])
    merged = metric.compute(metric.merge(a, b))
    direct = frechet.stats_of(np.concatenate([ours(images[:BATCH])[0], ours(images[BATCH:])[0]]))
    assert merged.count == 2 * BATCH
    np.testing.assert_allclose(merged.mu, direct.mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, direct.sigma, rtol=1e-9, atol=1e-15)


def test_random_weights_option_is_seeded_and_usable():
    a, b = fid.load_fid_inception(random_seed=0), fid.load_fid_inception(random_seed=0)
    assert a.weights == "random(seed=0)"
    for x, y in zip(_leaves(a.variables), _leaves(b.variables), strict=True):
        np.testing.assert_array_equal(x, y)
    pool3, logits = a(_photos(SIZE, BATCH))
    assert np.isfinite(pool3).all() and np.isfinite(logits).all()
    assert pool3.std(axis=0).max() > 0  # the images are told apart


def test_weight_errors_are_clear(reference, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub_home"))
    with pytest.raises(CheckpointError, match="pytorch-fid publishes it at https://github.com"):
        fid.load_fid_inception()
    with pytest.raises(CheckpointError, match="nope.pth"):
        fid.fid_of_paths(folders["a"], folders["b"], inception_weights=str(tmp_path / "nope.pth"))
    (tmp_path / "bad.npz").write_bytes(b"not statistics")
    with pytest.raises(CheckpointError, match="bad.npz"):
        fid.fid_of_paths(str(tmp_path / "bad.npz"), str(tmp_path / "bad.npz"))
    state = load_state_dict(reference[2])
    where = "w.pth"
    missing = {k: v for k, v in state.items() if k != "Mixed_6c.branch7x7_3.bn.running_var"}
    with pytest.raises(CheckpointError, match="missing tensor Mixed_6c.branch7x7_3.bn.running_var"):
        inception_net.convert_state_dict(missing, where)
    wrong = {**state, "fc.weight": np.zeros((1000, 2048), np.float32)}  # torchvision's classes
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \(1000, 2048\)"):
        inception_net.convert_state_dict(wrong, where)
    extra = {**state, "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)}
    with pytest.raises(CheckpointError, match="unexpected tensors AuxLogits.fc.weight"):
        inception_net.convert_state_dict(extra, where)


def test_fid_input_errors_are_metric_errors(ours, folders):
    one = os.path.join(folders["a"], "000.png")
    with pytest.raises(MetricError, match="at least 2 samples"):
        fid.fid_of_paths(one, folders["b"], inception_weights=ours, batch_size=BATCH)
    # Model samples in [-1, 1] must be mapped to [0, 1] first.
    with pytest.raises(MetricError, match=r"floats in \[0, 1\]"):
        ours(np.full((1, SIZE, SIZE, 3), -0.5, np.float32))
