"""torchvision's AlexNet, VGG16 and SqueezeNet 1.1 feature stacks in Flax (NHWC).

Each module returns the intermediate ReLU activations where the `lpips` package's
`pretrained_networks.py` slices `torchvision.models.<net>().features`: five for AlexNet
(after features 1, 4, 7, 9, 11) and VGG16 (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), seven
for SqueezeNet 1.1 (after features 1, 4, 7, 9, 10, 11, 12). Layers after the last tap are not
built. Convolutions use torch's explicit zero padding and max-pooling follows
`torch.nn.MaxPool2d` exactly, ceil_mode included (SqueezeNet 1.1 pools with ceil_mode=True,
which adds a partial window at the bottom/right edge).

Parameters are named after the torchvision state dict: `features.3.squeeze.weight` (OIHW) is
`params["features_3"]["squeeze"]["kernel"]` (HWIO), so `backbone_params` converts a
torchvision `.pth` (or a safetensors copy of it) by name, checking every shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t2i_jax.errors import ConfigError
from t2i_jax.nets import torch_weights

# VGG16 ("D") features: conv layers by ReLU name -> (torchvision feature index, channels).
# A max-pool (2x2, stride 2) precedes the first conv of every stage after the first.
VGG16_RELUS: dict[str, tuple[int, int]] = {
    "relu1_1": (0, 64),
    "relu1_2": (2, 64),
    "relu2_1": (5, 128),
    "relu2_2": (7, 128),
    "relu3_1": (10, 256),
    "relu3_2": (12, 256),
    "relu3_3": (14, 256),
    "relu4_1": (17, 512),
    "relu4_2": (19, 512),
    "relu4_3": (21, 512),
    "relu5_1": (24, 512),
    "relu5_2": (26, 512),
    "relu5_3": (28, 512),
}
LPIPS_VGG_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

# The torchvision ImageNet weight files each backbone is converted from.
TORCHVISION_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def torch_max_pool(
    x: jax.Array, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> jax.Array:
    """`torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=...)` on NHWC input.

    Output size is floor or ceil of (H + 2p - k) / s, plus one; with ceil_mode the last
    window is dropped if it would start in the right padding (torch's rule). Padding never
    wins the max (it is -inf).
    """
    spatial = []
    for size in x.shape[1:3]:
        span = size + 2 * padding - kernel
        out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
        if ceil_mode and (out - 1) * stride >= size + padding:
            out -= 1
        high = max((out - 1) * stride + kernel - size - padding, 0)
        spatial.append((out, (padding, high)))
    y = jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), spatial[0][1], spatial[1][1], (0, 0)),
    )
    return y[:, : spatial[0][0], : spatial[1][0]]


def _conv(
    features: int,
    kernel: int,
    index: int,
    precision,
    stride: int = 1,
    padding: int = 0,
    name: str | None = None,
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        precision=precision,
        name=name or f"features_{index}",
    )


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet `features[:12]`; returns relu1..relu5 (64, 192, 384, 256, 256 ch)."""

    precision: jax.lax.Precision | str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        p = self.precision
        h1 = nn.relu(_conv(64, 11, 0, p, stride=4, padding=2)(x))
        h2 = nn.relu(_conv(192, 5, 3, p, padding=2)(torch_max_pool(h1, 3, 2)))
        h3 = nn.relu(_conv(384, 3, 6, p, padding=1)(torch_max_pool(h2, 3, 2)))
        h4 = nn.relu(_conv(256, 3, 8, p, padding=1)(h3))
        h5 = nn.relu(_conv(256, 3, 10, p, padding=1)(h4))
        return h1, h2, h3, h4, h5


class VGG16Features(nn.Module):
    """torchvision VGG16 `features`, up to the last requested ReLU; returns those ReLUs in order.

    `outputs` names ReLUs as in VGG16_RELUS (default: LPIPS's five taps).
    """

    outputs: Sequence[str] = LPIPS_VGG_LAYERS
    precision: jax.lax.Precision | str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        unknown = [n for n in self.outputs if n not in VGG16_RELUS]
        if unknown or not self.outputs:
            raise ConfigError(f"VGG16 layers must be among {list(VGG16_RELUS)}, got {unknown}")
        last = max(VGG16_RELUS[n][0] for n in self.outputs)
        taps = {}
        stage = 1
        for name, (index, channels) in VGG16_RELUS.items():
            if index > last:
                break
            if not name.startswith(f"relu{stage}_"):
                stage += 1
                x = torch_max_pool(x, 2, 2)
            x = nn.relu(_conv(channels, 3, index, self.precision, padding=1)(x))
            taps[name] = x
        return tuple(taps[n] for n in self.outputs)


class Fire(nn.Module):
    """torchvision SqueezeNet Fire: 1x1 squeeze, then [1x1 expand, 3x3 expand] concatenated."""

    squeeze_planes: int
    expand_planes: int
    precision: jax.lax.Precision | str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        s = nn.relu(_conv(self.squeeze_planes, 1, 0, p, name="squeeze")(x))
        e1 = nn.relu(_conv(self.expand_planes, 1, 0, p, name="expand1x1")(s))
        e3 = nn.relu(_conv(self.expand_planes, 3, 0, p, padding=1, name="expand3x3")(s))
        return jnp.concatenate([e1, e3], axis=-1)


class SqueezeNet11Features(nn.Module):
    """torchvision SqueezeNet 1.1 `features`; returns 7 taps (64, 128, 256, 384, 384, 512, 512)."""

    precision: jax.lax.Precision | str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        p = self.precision

        def fire(index: int, squeeze: int, expand: int, h: jax.Array) -> jax.Array:
            return Fire(squeeze, expand, p, name=f"features_{index}")(h)

        h1 = nn.relu(_conv(64, 3, 0, p, stride=2)(x))
        h = torch_max_pool(h1, 3, 2, ceil_mode=True)
        h2 = fire(4, 16, 64, fire(3, 16, 64, h))
        h = torch_max_pool(h2, 3, 2, ceil_mode=True)
        h3 = fire(7, 32, 128, fire(6, 32, 128, h))
        h = torch_max_pool(h3, 3, 2, ceil_mode=True)
        h4 = fire(9, 48, 192, h)
        h5 = fire(10, 48, 192, h4)
        h6 = fire(11, 64, 256, h5)
        h7 = fire(12, 64, 256, h6)
        return h1, h2, h3, h4, h5, h6, h7


def backbone(net: str, precision: jax.lax.Precision | str | None = None) -> nn.Module:
    """The feature module of an LPIPS backbone: "alex", "vgg" or "squeeze"."""
    if net == "alex":
        return AlexNetFeatures(precision=precision)
    if net == "vgg":
        return VGG16Features(precision=precision)
    if net == "squeeze":
        return SqueezeNet11Features(precision=precision)
    raise ConfigError(f"unknown LPIPS backbone {net!r}: expected alex, vgg or squeeze")


def _param_shapes(net: str) -> dict:
    """{flax path: shape} of every backbone parameter, without computing anything."""
    module = backbone(net)
    if net == "vgg":  # every conv, so the tree serves any choice of VGG taps
        module = VGG16Features(outputs=("relu5_3",))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return traverse_util.flatten_dict(shapes["params"])


def torch_name(path: tuple[str, ...]) -> str:
    """Flax path ("features_3", "squeeze", "kernel") -> torch name "features.3.squeeze.weight"."""
    head = path[0].replace("_", ".", 1)
    leaf = {"kernel": "weight", "bias": "bias"}[path[-1]]
    return ".".join((head, *path[1:-1], leaf))


def params_from_state_dict(net: str, state_dict: dict[str, np.ndarray], where: str) -> dict:
    """Flax params of `backbone(net)` from a torchvision state dict (extra entries ignored)."""
    flat = {}
    for path, leaf in _param_shapes(net).items():
        if path[-1] == "kernel":
            h, w, i, o = leaf.shape
            value = torch_weights.require(state_dict, torch_name(path), (o, i, h, w), where)
            value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
        else:
            value = torch_weights.require(state_dict, torch_name(path), leaf.shape, where)
        flat[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(net: str, params: dict) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict`: torchvision names, OIHW kernels."""
    state_dict = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            value = np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))  # HWIO -> OIHW
        state_dict[torch_name(path)] = value
    return state_dict


def backbone_params(net: str, path: str) -> dict:
    """Flax params of `backbone(net)` read from a torchvision `.pth` or `.safetensors` file."""
    backbone(net)  # validates the name before the file is read
    return params_from_state_dict(net, torch_weights.load_state_dict(path), path)


def random_backbone_params(net: str, seed: int) -> dict:
    """Random (not ImageNet) params, for tests and research on random features.

    He-normal kernels (std sqrt(2 / fan_in), so ReLU activations keep their scale through
    VGG's 13 layers) and zero biases, all drawn from jax.random.key(seed).
    """
    kernels = sorted((p, leaf.shape) for p, leaf in _param_shapes(net).items() if p[-1] == "kernel")
    # One draw for all kernels, cut on the host: per-shape draws (or running `init`, which
    # traces the forward pass) would compile a program for every layer.
    noise = np.asarray(
        jax.random.normal(jax.random.key(seed), (sum(math.prod(s) for _, s in kernels),))
    )
    flat, start = {}, 0
    for path, shape in kernels:
        size = math.prod(shape)
        std = math.sqrt(2.0 / math.prod(shape[:-1]))
        flat[path] = jnp.asarray(std * noise[start : start + size].reshape(shape))
        flat[path[:-1] + ("bias",)] = jnp.zeros(shape[-1:], jnp.float32)
        start += size
    return traverse_util.unflatten_dict(flat)
