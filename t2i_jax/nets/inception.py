"""pytorch-fid's FID Inception v3 in Flax Linen (NHWC), and the conversion of its weights.

The network is `pytorch_fid.inception.fid_inception_v3()`: torchvision's Inception3 stem
and InceptionB/D blocks, with the FID patches (InceptionA/C/E average pools that do not
count the padding, a 3x3 stride-1 max pool in Mixed_7c), BatchNorm eps 0.001 in eval mode.
It returns the pool3 features [B, 2048] (the spatial mean after Mixed_7c, what FID uses)
and the logits of its `fc` layer [B, 1008] (what the Inception Score uses). Input is the
already preprocessed [B, 299, 299, 3] image in [-1, 1]; `t2i_jax.metrics.fid` resizes.

Submodules carry the torch names (`Mixed_5b/branch1x1/conv`), so a pytorch-fid state dict
converts by name: conv OIHW -> HWIO, `bn.weight/bias` -> scale/bias, running statistics
-> `batch_stats`, `fc.weight` transposed.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t2i_jax.errors import CheckpointError
from t2i_jax.nets.torch_weights import require

NUM_CLASSES = 1008  # The TF 2015 graph's 1001 classes, padded to 1008 by its authors.
POOL3_DIM = 2048


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias, torch's explicit padding), BN eps 1e-3, ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TF's average pool (the FID patch): padded zeros are not counted in the mean.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """FIDInceptionA."""

    pool_features: int
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a): the 35 -> 17 reduction."""

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC."""

    channels_7x7: int
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a): the 17 -> 8 reduction."""

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (average pool) or, with `max_pool`, FIDInceptionE_2 (Mixed_7c)."""

    max_pool: bool = False
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            # The FID graph's quirk: a max pool here; torch pads it with -inf, as reduce_window.
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """[B, 299, 299, 3] in [-1, 1] -> (pool3 [B, 2048], fc logits [B, 1008]).

    Convolutions run at HIGHEST precision by default: on GPUs the default would use TF32,
    and FID is compared across papers to a few decimals.
    """

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = self.precision
        x = BasicConv(32, (3, 3), (2, 2), precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
        logits = nn.Dense(NUM_CLASSES, precision=p, name="fc")(pool3)
        return pool3, logits


@functools.cache
def variable_shapes() -> dict:
    """The model's variables as ShapeDtypeStructs (traced once, no computation)."""
    x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)


def _torch_name(collection: str, path: tuple[str, ...]) -> tuple[str, str]:
    """(torch state-dict name, how to convert) of one Flax variable."""
    *module, leaf = path
    prefix = ".".join(module)
    if collection == "batch_stats":
        return f"{prefix}.running_{leaf}", "copy"  # mean / var
    if leaf == "kernel" and module[-1] == "conv":
        return f"{prefix}.weight", "conv"
    if leaf == "kernel":
        return f"{prefix}.weight", "dense"
    if leaf == "scale":
        return f"{prefix}.weight", "copy"
    return f"{prefix}.bias", "copy"


def convert_state_dict(state_dict: dict[str, np.ndarray], where: str) -> dict:
    """Flax variables {"params", "batch_stats"} from pytorch-fid's `fid_inception_v3()` names.

    Every tensor must be present with its exact shape, and no unknown tensor may be left
    over (a torchvision ImageNet Inception, say, is refused rather than half-loaded).
    """
    shapes = variable_shapes()
    used = set()
    out: dict = {}
    for collection, tree in shapes.items():
        flat = {}
        for path, spec in traverse_util.flatten_dict(tree).items():
            name, kind = _torch_name(collection, path)
            if kind == "conv":
                kh, kw, cin, cout = spec.shape
                value = require(state_dict, name, (cout, cin, kh, kw), where).transpose(2, 3, 1, 0)
            elif kind == "dense":
                din, dout = spec.shape
                value = require(state_dict, name, (dout, din), where).T
            else:
                value = require(state_dict, name, spec.shape, where)
            if not np.issubdtype(value.dtype, np.floating):
                raise CheckpointError(f"{where}: {name} has dtype {value.dtype}, expected floats")
            flat[path] = np.ascontiguousarray(value, np.float32)
            used.add(name)
        out[collection] = traverse_util.unflatten_dict(flat)
    ignored = ("num_batches_tracked",)  # BN training counter, not used in eval mode
    unknown = sorted(k for k in state_dict if k not in used and not k.endswith(ignored))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise CheckpointError(
            f"{where}: not pytorch-fid's FID Inception (unexpected tensors {', '.join(unknown[:3])}"
            f"{more})"
        )
    return out


def random_variables(seed: int) -> dict:
    """Random weights and BN statistics of the right shapes (tests and benchmarks only).

    Conv kernels get He-scaled normals and BN a mild random affine, so activations stay of
    order one through the 90-odd layers and the features are not degenerate.
    """
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(variable_shapes())
    out = {}
    for path, spec in flat.items():
        leaf = path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(spec.shape[:-1]))
            value = rng.normal(0, np.sqrt(2.0 / fan_in), spec.shape)
        elif leaf == "scale":
            value = rng.uniform(0.5, 1.5, spec.shape)
        elif leaf == "var":
            value = rng.uniform(0.5, 2.0, spec.shape)
        else:  # bias, mean
            value = rng.normal(0, 0.1, spec.shape)
        out[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)
