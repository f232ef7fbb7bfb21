"""LPIPS (alex, vgg, squeeze) and the VGG perceptual loss against the `lpips` package and torch.

The ImageNet backbones cannot be downloaded here, so each torch `lpips.LPIPS` is built with a
seeded random backbone (pnet_rand=True; its linear layers are the package's real v0.1
weights); that backbone's state dict, saved under torchvision's names, is what ours loads.
"""

import functools
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.numpy import save_file
from skimage import data as skdata

from t2i_jax.errors import CheckpointError, MetricError
from t2i_jax.metrics import lpips as ours
from t2i_jax.metrics import perceptual
from t2i_jax.nets import lpips as lpips_net
from t2i_jax.nets import lpips_backbones
from t2i_jax.nets.torch_weights import load_state_dict

NETS = ("alex", "vgg", "squeeze")
# Measured max relative difference of the distances is < 1e-6 for every net (float32 convs
# in torch and XLA sum in different orders); rtol 1e-5 leaves a 10x margin.
RTOL = 1e-5


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Four scikit-image photographs at 64x64, float32 in [-1, 1]."""
    images = [
        Image.fromarray(image).convert("RGB").resize((64, 64), Image.BICUBIC)
        for image in (skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket())
    ]
    return np.stack([np.asarray(i) for i in images]).astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def pairs(photos) -> tuple[np.ndarray, np.ndarray]:
    """Each photo against a noisy copy of itself and against another photo."""
    noisy = np.clip(photos + np.random.default_rng(0).normal(0, 0.2, photos.shape), -1, 1)
    x = np.concatenate([photos, photos[:2]])
    y = np.concatenate([noisy.astype(np.float32), photos[2:]])
    return x, y


_TORCH_MODELS: dict[str, lpips.LPIPS] = {}


def torch_lpips(net: str) -> lpips.LPIPS:
    """lpips.LPIPS with a seeded random backbone (built once per net)."""
    if net not in _TORCH_MODELS:
        torch.manual_seed({"alex": 1, "vgg": 2, "squeeze": 3}[net])
        _TORCH_MODELS[net] = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    return _TORCH_MODELS[net]


def torchvision_state_dict(model: lpips.LPIPS) -> dict[str, torch.Tensor]:
    """lpips keeps torchvision's feature indices under `sliceK.`: net.slice2.3.weight is
    features.3.weight."""
    return {"features." + k.split(".", 1)[1]: v for k, v in model.net.state_dict().items()}


def save_backbone(model: lpips.LPIPS, path, legacy: bool = False) -> str:
    torch.save(torchvision_state_dict(model), str(path), _use_new_zipfile_serialization=not legacy)
    return str(path)


def scaled(x: np.ndarray) -> np.ndarray:
    return (x - np.asarray(lpips_net.SHIFT, np.float32)) / np.asarray(lpips_net.SCALE, np.float32)


@pytest.mark.parametrize("net", NETS)
def test_lpips_matches_lpips_package(net, pairs, tmp_path):
    model = torch_lpips(net)
    path = save_backbone(model, tmp_path / f"{net}.pth", legacy=net == "alex")
    params = ours.load_lpips(net, backbone_weights=path)
    # 66x70 random images: an even conv output before SqueezeNet's first ceil_mode pool, so
    # its partial windows are exercised (at 64x64 ceil and floor agree).
    rng = np.random.default_rng(1)
    rx, ry = (rng.uniform(-1, 1, (2, 66, 70, 3)).astype(np.float32) for _ in range(2))
    distance = jax.jit(ours.lpips_distance)
    for x, y in (pairs, (rx, ry)):
        with torch.no_grad():
            expected = model(nchw(x), nchw(y)).flatten().numpy()
        got = np.asarray(distance(params, x, y))
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)
    assert np.all(expected > 0)


@pytest.mark.parametrize("net,size", [("alex", 64), ("squeeze", 66)])
def test_backbone_features_match_torchvision_slices(net, size, photos, tmp_path):
    """Each tap on its own, to localise a mismatch to one layer."""
    model = torch_lpips(net)
    params = lpips_backbones.backbone_params(net, save_backbone(model, tmp_path / "b.pth"))
    x = scaled(np.asarray(jax.image.resize(photos[:2], (2, size, size, 3), "linear")))
    got = lpips_backbones.backbone(net).apply({"params": params}, x)
    with torch.no_grad():
        expected = [t.permute(0, 2, 3, 1).numpy() for t in model.net(nchw(x))]
    assert len(got) == len(expected) == model.L
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape, k
        # Relative to the tap's largest activation: measured < 3e-6.
        assert np.max(np.abs(np.asarray(g) - e)) <= 1e-5 * np.max(np.abs(e)), k


@pytest.mark.parametrize(
    "size,kernel,stride,padding,ceil_mode",
    [(15, 3, 2, 0, False), (32, 3, 2, 0, True), (31, 3, 2, 0, True), (9, 3, 2, 1, True),
     (8, 2, 2, 0, False), (11, 3, 3, 1, False), (10, 4, 3, 1, True)],
)  # fmt: skip
def test_torch_max_pool(size, kernel, stride, padding, ceil_mode):
    x = np.random.default_rng(size).normal(size=(1, size, size + 1, 2)).astype(np.float32)
    expected = F.max_pool2d(nchw(x), kernel, stride, padding, ceil_mode=ceil_mode)
    got = lpips_backbones.torch_max_pool(jnp.asarray(x), kernel, stride, padding, ceil_mode)
    np.testing.assert_array_equal(np.asarray(got), expected.permute(0, 2, 3, 1).numpy())


def test_safetensors_backbone_equals_pth(tmp_path):
    model = torch_lpips("alex")
    from_pth = lpips_backbones.backbone_params("alex", save_backbone(model, tmp_path / "a.pth"))
    arrays = {k: v.numpy() for k, v in torchvision_state_dict(model).items()}
    save_file(arrays, str(tmp_path / "a.safetensors"))
    from_st = lpips_backbones.backbone_params("alex", str(tmp_path / "a.safetensors"))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), from_pth, from_st))
    kernel = arrays["features.3.weight"]  # OIHW
    np.testing.assert_array_equal(from_pth["features_3"]["kernel"], kernel.transpose(2, 3, 1, 0))


def test_wrong_backbone_file_is_a_checkpoint_error(tmp_path):
    path = save_backbone(torch_lpips("alex"), tmp_path / "alex.pth")
    with pytest.raises(CheckpointError, match="features.0.weight has shape"):
        ours.load_lpips("squeeze", backbone_weights=path)


@pytest.mark.parametrize("net", NETS)
def test_shipped_linear_weights_equal_lpips_package(net):
    package = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth")
    expected = torch.load(package, map_location="cpu", weights_only=True)
    shipped = load_state_dict(lpips_net.linear_weights_file(net))
    assert sorted(shipped) == sorted(expected)
    for name, tensor in expected.items():
        assert shipped[name].dtype == np.float32
        np.testing.assert_array_equal(shipped[name], tensor.numpy())
    # ...and they are what the torch model computes with.
    for k, layer in enumerate(torch_lpips(net).lins):
        torch_weight = layer.model[-1].weight.detach().numpy()[0, :, 0, 0]
        np.testing.assert_array_equal(lpips_net.load_linear_weights(net)[k], torch_weight)


class _Payload:
    """Pickles as a call to os.system that would create `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _NotATensor:
    pass


def test_hostile_pth_files_are_refused_without_running_anything(tmp_path):
    marker = tmp_path / "executed"
    # 1. torch.save of a dict holding an object of a class the loader does not allow.
    saved = tmp_path / "object.pth"
    torch.save({"weight": torch.zeros(2), "extra": _NotATensor()}, str(saved))
    # 2. a hand-made torch zip archive whose data.pkl calls os.system.
    archive = tmp_path / "archive.pth"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": _Payload(str(marker))}, protocol=2))
        z.writestr("archive/version", "3\n")
    # 3. the same payload as a legacy (non-zip) file.
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    for path in (saved, archive, legacy):
        with pytest.raises(CheckpointError, match="refusing to load"):
            load_state_dict(str(path))
        assert not marker.exists()
    # The payload is live: unpickled normally it does create the marker.
    pickle.loads(pickle.dumps(_Payload(str(marker))))
    assert marker.exists()


def test_merged_shards_equal_one_pass(pairs):
    params = ours.load_lpips("alex", random_backbone_seed=0)
    metric = ours.lpips_metric(params)
    x, y = pairs
    whole = metric.update(metric.init(), x, y)
    shards = [metric.update(metric.init(), x[i : i + 2], y[i : i + 2]) for i in (0, 2, 4)]
    merged = metric.merge(metric.merge(shards[0], shards[1]), shards[2])
    assert int(merged["count"]) == int(whole["count"]) == len(x)
    expected = np.mean(np.asarray(ours.lpips_distance(params, x, y), np.float64))
    np.testing.assert_allclose(float(metric.compute(merged)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(metric.compute(merged)), float(metric.compute(whole)), 1e-6)


def test_lpips_gradient_is_finite(photos):
    params = ours.load_lpips("alex", random_backbone_seed=0)
    # The first image scales to exactly 0, so with zero biases every tap is all-zero there:
    # sqrt'(0) of the channel norm is infinite; the ReLUs must keep it out of the gradient.
    x = jnp.stack([jnp.broadcast_to(jnp.asarray(lpips_net.SHIFT), (64, 64, 3)), photos[0]])
    grad = jax.jit(jax.grad(lambda a: ours.lpips_distance(params, a, photos[1:3]).sum()))(x)
    assert np.all(np.isfinite(grad)) and np.any(grad[1] != 0)


def test_load_lpips_without_backbone_weights_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="vgg16-397923af.pth"):
        ours.load_lpips("vgg")
    with pytest.raises(CheckpointError, match="not found"):
        ours.load_lpips("alex", backbone_weights="missing.pth")


def test_compare_images_of_folders(photos, tmp_path):
    model = torch_lpips("alex")
    weights = save_backbone(model, tmp_path / "alex.pth")
    a = ((photos + 1) * 127.5).round().astype(np.uint8)
    b = a[::-1].copy()
    for folder, images in (("a", a), ("b", b)):
        os.makedirs(tmp_path / folder)
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / folder / f"{i}.png")
    result = ours.compare_images(
        str(tmp_path / "a"), str(tmp_path / "b"), net="alex", backbone_weights=weights, batch_size=3
    )
    with torch.no_grad():
        expected = model(nchw(a / 127.5 - 1.0).float(), nchw(b / 127.5 - 1.0).float()).flatten()
    assert result["metric"] == "lpips_alex" and result["count"] == 4
    np.testing.assert_allclose(result["per_image"], expected.numpy(), rtol=RTOL)
    np.testing.assert_allclose(result["value"], expected.double().mean().item(), rtol=RTOL)
    single = ours.compare_images(
        str(tmp_path / "a" / "0.png"), str(tmp_path / "b" / "0.png"), backbone_weights=weights
    )
    assert single["count"] == 1
    np.testing.assert_allclose(single["value"], result["per_image"][0], rtol=RTOL)


# VGG perceptual loss: torchvision's vgg16 features with the same weights as reference.
VGG_RELU_INDEX = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 18, "relu5_1": 25}


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """A seeded torchvision VGG16 and our params loaded from its saved state dict."""
    torch.manual_seed(4)
    features = torchvision.models.vgg16(weights=None).features.eval()
    path = str(tmp_path_factory.mktemp("vgg") / "vgg16.pth")
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return features, perceptual.load_vgg16_params(path)


def test_perceptual_loss_matches_torch(vgg, photos):
    features, params = vgg
    x, y = photos[:2, :32, :32], photos[2:, :32, :32]
    got = np.asarray(perceptual.vgg_perceptual_loss(params, x, y))
    mean = torch.tensor(perceptual.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(perceptual.IMAGENET_STD).view(1, 3, 1, 1)
    h = (nchw(np.concatenate([x, y])) + 1) / 2
    h = (h - mean) / std
    expected = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        taps = {}
        for i, layer in enumerate(features[:26]):
            h = layer(h)
            taps[i] = h.clone()
        for name, weight in zip(perceptual.DEFAULT_LAYERS, perceptual.DEFAULT_WEIGHTS, strict=True):
            fx, fy = taps[VGG_RELU_INDEX[name]].chunk(2)
            expected += weight * (fx - fy).abs().mean(dim=(1, 2, 3)).double()
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_perceptual_loss_is_a_usable_training_loss(vgg, photos):
    _, params = vgg
    x, y = jnp.asarray(photos[:2, :32, :32]), jnp.asarray(photos[2:, :32, :32])
    options = ({}, {"distance": "l2", "normalize": True, "layers": ("relu2_2",), "weights": (1.0,)})
    for kwargs in options:
        loss = functools.partial(perceptual.vgg_perceptual_loss, **kwargs)
        values = jax.jit(lambda a, b, f=loss: jnp.stack([f(params, a, a), f(params, a, b)]))(x, y)
        assert np.all(np.asarray(values[0]) == 0) and np.all(np.asarray(values[1]) > 0)
        grad = jax.jit(jax.grad(lambda a, f=loss: f(params, a, y).sum()))(x)
        assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    # The VGG weights are constants of the loss.
    param_grad = jax.jit(jax.grad(lambda p: loss(p, x, y).sum()))(params)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(param_grad))


def test_images_too_small_for_the_backbone_are_an_error():
    model = ours.load_lpips("alex", random_backbone_seed=0)
    x = np.zeros((1, 16, 16, 3), np.float32)
    # AlexNet's pools leave an empty map at 16x16; the mean of nothing would be NaN.
    with pytest.raises(MetricError, match="too small"):
        ours.lpips_distance(model, x, x)
