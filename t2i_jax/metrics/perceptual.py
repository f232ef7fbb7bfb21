"""VGG16 feature-matching (perceptual) loss for training, on NHWC images in [-1, 1].

Convention followed by default: pix2pixHD's VGGLoss taps and weights (Wang et al. 2018), with
ImageNet input normalisation (pix2pixHD feeds raw [-1, 1] images to VGG19 and detaches the
target; here both images carry gradients) -- torchvision VGG16 ImageNet weights, inputs
mapped to [0, 1] and normalised with the ImageNet mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), ReLU taps relu1_1 .. relu5_1 with
weights 1/32, 1/16, 1/8, 1/4, 1, and the mean absolute (L1) difference of the raw features
per tap. pix2pixHD uses VGG19; with VGG16 the same tap names are used. Options: `distance="l2"`
(mean squared difference, as Johnson et al.'s feature reconstruction loss), and
`normalize=True` (LPIPS's channel unit-normalisation x / (|x| + 1e-10) before the
difference, which makes the taps scale-free). No resizing: the loss runs at the images' own
resolution.

The VGG params are constants (`stop_gradient`); the loss is differentiable in both images.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from t2i_jax.errors import ConfigError
from t2i_jax.nets import lpips_backbones
from t2i_jax.nets.lpips import unit_normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
DEFAULT_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def load_vgg16_params(path: str) -> dict:
    """VGG16 feature params from torchvision's vgg16-397923af.pth (or a safetensors copy)."""
    return lpips_backbones.backbone_params("vgg", path)


def imagenet_normalize(x: jax.Array) -> jax.Array:
    """[-1, 1] -> [0, 1] -> (x - mean) / std, per RGB channel (last axis)."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return ((x.astype(jnp.float32) + 1.0) / 2.0 - mean) / std


def vgg_perceptual_loss(
    vgg_params: dict,
    x: jax.Array,
    y: jax.Array,
    *,
    layers: Sequence[str] = DEFAULT_LAYERS,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    distance: str = "l1",
    normalize: bool = False,
    precision: jax.lax.Precision | str | None = None,
) -> jax.Array:
    """Weighted sum over `layers` of the mean feature difference between x and y -> [B]."""
    if len(layers) != len(weights):
        raise ConfigError(f"{len(layers)} layers but {len(weights)} weights")
    if distance not in ("l1", "l2"):
        raise ConfigError(f"distance must be 'l1' or 'l2', got {distance!r}")
    if x.shape != y.shape:
        raise ValueError(f"images must have equal shapes, got {x.shape} and {y.shape}")
    params = jax.lax.stop_gradient(vgg_params)
    module = lpips_backbones.VGG16Features(outputs=tuple(layers), precision=precision)
    taps = module.apply({"params": params}, imagenet_normalize(jnp.concatenate([x, y])))
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for tap, weight in zip(taps, weights, strict=True):
        fx, fy = jnp.split(tap.astype(jnp.float32), 2)
        if normalize:
            fx, fy = unit_normalize(fx), unit_normalize(fy)
        diff = fx - fy
        per_position = jnp.abs(diff) if distance == "l1" else diff * diff
        total = total + weight * jnp.mean(per_position, axis=(1, 2, 3))
    return total
