"""The LPIPS v0.1 network (Zhang et al. 2018) as the `lpips` package computes it, for NHWC
images in [-1, 1]: a distance for metrics (metrics/lpips.py) and a perceptual loss (VQ-VAE).

Convention followed (lpips 0.1.4, `LPIPS(net, version="0.1")` in eval mode, spatial=False):
ScalingLayer (x - shift) / scale with shift [-.030, -.088, -.188] and scale [.458, .448, .450];
the backbone's ReLU taps (see `t2i_jax.nets.lpips_backbones`); per-position channel
unit-normalisation x / (sqrt(sum_c x^2) + 1e-10); squared difference; the package's 1x1 linear
layers (no bias); spatial mean; sum over taps. One value per image pair.

The linear layers ship with this package (converted from lpips' `weights/v0.1/*.pth`, BSD-2,
see assets/lpips/LICENSE). The ImageNet backbones cannot be downloaded here, so the user
passes torchvision's state-dict file; `random_backbone_seed` builds random backbones instead.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from t2i_jax.errors import CheckpointError, ConfigError, MetricError
from t2i_jax.nets import lpips_backbones, torch_weights

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
CHANNELS = {
    "alex": (64, 192, 384, 256, 256),
    "vgg": (64, 128, 256, 512, 512),
    "squeeze": (64, 128, 256, 384, 384, 512, 512),
}
_TORCHVISION_URL = "https://download.pytorch.org/models/"


@struct.dataclass
class LPIPS:
    """LPIPS parameters: the backbone's Flax params and one [C] linear weight per tap.

    A pytree (`net` is static), so it passes through `jax.jit` as an argument.
    """

    backbone: Any
    linear: tuple[jax.Array, ...]
    net: str = struct.field(pytree_node=False, default="alex")

    def distance(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return lpips_distance(self, x, y)


def linear_weights_file(net: str) -> str:
    """Path of the shipped safetensors file holding `lin{k}.model.1.weight` for `net`."""
    if net not in CHANNELS:
        raise ConfigError(f"unknown LPIPS net {net!r}: expected alex, vgg or squeeze")
    files = importlib.resources.files("t2i_jax.metrics")
    return str(files.joinpath("assets", "lpips", f"{net}.safetensors"))


def load_linear_weights(net: str) -> tuple[jax.Array, ...]:
    """The shipped v0.1 linear layers of `net`, each flattened from [1, C, 1, 1] to [C]."""
    path = linear_weights_file(net)
    state = torch_weights.load_state_dict(path)
    return tuple(
        jnp.asarray(torch_weights.require(state, f"lin{k}.model.1.weight", (1, c, 1, 1), path))[
            0, :, 0, 0
        ]
        for k, c in enumerate(CHANNELS[net])
    )


def load_lpips(
    net: str = "alex",
    backbone_weights: str | None = None,
    *,
    random_backbone_seed: int | None = None,
) -> LPIPS:
    """LPIPS-`net` with the backbone read from a torchvision state-dict file (or random).

    `backbone_weights`: torchvision's alexnet-owt-7be5be79.pth / vgg16-397923af.pth /
    squeezenet1_1-b8a52dc0.pth, or a safetensors file with the same names.
    """
    linear = load_linear_weights(net)
    if backbone_weights is not None and random_backbone_seed is not None:
        raise ConfigError("pass either backbone_weights or random_backbone_seed, not both")
    if backbone_weights is not None:
        params = lpips_backbones.backbone_params(net, backbone_weights)
    elif random_backbone_seed is not None:
        params = lpips_backbones.random_backbone_params(net, random_backbone_seed)
    else:
        name = lpips_backbones.TORCHVISION_FILES[net]
        raise CheckpointError(
            f"LPIPS-{net} needs torchvision's ImageNet backbone, which is not downloaded here: "
            f"pass the state-dict file {name} ({_TORCHVISION_URL}{name}) as backbone_weights "
            "(--backbone-weights)"
        )
    return LPIPS(backbone=params, linear=linear, net=net)


def unit_normalize(f: jax.Array) -> jax.Array:
    """Each position's channel vector divided by (its L2 norm + 1e-10), as lpips."""
    # Where all channels are 0, sqrt'(0) makes this gradient NaN, but every tap comes out of
    # a ReLU whose backward pass selects 0 there, so no NaN reaches the images.
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)


def lpips_distance(params: LPIPS, x: jax.Array, y: jax.Array) -> jax.Array:
    """LPIPS between NHWC images x, y in [-1, 1] -> [B]. Differentiable in x and y."""
    if x.shape != y.shape:
        raise ValueError(f"images must have equal shapes, got {x.shape} and {y.shape}")
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    # One backbone pass over both sets; "highest" keeps TF32 out of the metric on GPUs.
    both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale
    module = lpips_backbones.backbone(params.net, precision="highest")
    taps = module.apply({"params": params.backbone}, both)
    if any(0 in tap.shape[1:3] for tap in taps):  # static shapes: checked while tracing
        raise MetricError(
            f"images of {x.shape[1]}x{x.shape[2]} are too small for the {params.net} backbone "
            "(a pooling layer leaves nothing); use larger images"
        )
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for tap, w in zip(taps, params.linear, strict=True):
        fx, fy = jnp.split(tap, 2)
        diff = (unit_normalize(fx) - unit_normalize(fy)) ** 2
        total = total + jnp.mean(
            jnp.einsum("bhwc,c->bhw", diff, w, precision="highest"), axis=(1, 2)
        )
    return total
