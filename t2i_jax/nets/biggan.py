"""BigGAN (Brock et al. 2019) generator and discriminator, conditioned on text, sized by
the image resolution.

Generator: z is split into one chunk per block plus one (the hierarchical latent; sizes
differ by at most one when they do not divide z_dim); the first chunk -> SN Dense -> 4x4
map; per upsampling block (residual, BigGAN's): conditional BN, ReLU, 2x nearest
upsampling, SN 3x3 conv, conditional BN, ReLU, SN 3x3 conv, plus an SN 1x1 conv of the
upsampled input. Each block's condition is [shared text embedding, its z chunk] (the
shared-embedding design: one Dense of the sentence vector, read by every block's gains
and biases). A self-attention block (SAGAN) after the block that reaches
`attention_resolution`; then BN, ReLU, SN 3x3 conv to RGB.

Discriminator: residual blocks of SN convs (the first at full resolution, without its
leading ReLU; then one per halving down to 4x4) with self-attention at
`attention_resolution`, ReLU, global sum pool, and the projection head: logit =
linear(h) + <embed(t), h>, every layer spectrally normalised.

Both networks carry collections besides `params`: `spectral` (every SN layer's u;
nets/spectral_norm.py) and, in G, `batch_stats` (the BN running statistics). The GAN
method keeps them in the train state, advances `spectral` once per step and the running
statistics with G's own update; `batch_moments` is sown in training mode for standing
statistics (methods/gan.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import partitioning as part
from t2i_jax import remat as rematerialise
from t2i_jax.layers import pyramid_levels, upsample_nearest
from t2i_jax.nets.spectral_norm import SPECTRAL, SNConv, SNDense

BATCH_STATS = "batch_stats"  # running mean and variance of every BN
BATCH_MOMENTS = "batch_moments"  # one batch's mean and variance, sown in training mode


class BatchNorm(nn.Module):
    """Batch normalisation whose gain and bias are per sample: 1 + Dense(cond) and
    Dense(cond) (SN, no bias; BigGAN's conditional BN), or learned per channel when
    `cond` is None. Training mode normalises by the batch's moments (sown in
    `batch_moments`) and moves the running ones in `batch_stats` when that collection is
    mutable; otherwise the running ones are used."""

    momentum: float = 0.9  # running = momentum * running + (1 - momentum) * batch
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None, *, train: bool) -> jax.Array:
        channels = x.shape[-1]
        mean_s = self.variable(BATCH_STATS, "mean", jnp.zeros, (channels,), jnp.float32)
        var_s = self.variable(BATCH_STATS, "var", jnp.ones, (channels,), jnp.float32)
        xf = x.astype(jnp.float32)
        if train:
            # Over the whole (possibly sharded) batch: jit makes the mean a cross-device one.
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            if self.is_mutable_collection(BATCH_STATS) and not self.is_initializing():
                m = self.momentum
                mean_s.value = m * mean_s.value + (1.0 - m) * mean
                var_s.value = m * var_s.value + (1.0 - m) * var
            self.sow(BATCH_MOMENTS, "mean", mean)
            self.sow(BATCH_MOMENTS, "var", var)
        else:
            mean, var = mean_s.value, var_s.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if cond is None:
            gain = self.param("scale", nn.initializers.ones, (channels,))
            bias = self.param("bias", nn.initializers.zeros, (channels,))
        else:
            cond = cond.astype(self.dtype)
            gain = 1.0 + SNDense(channels, use_bias=False, dtype=self.dtype, name="gain")(cond)
            bias = SNDense(channels, use_bias=False, dtype=self.dtype, name="bias")(cond)
            gain, bias = gain[:, None, None, :], bias[:, None, None, :]
        return (y * gain + bias).astype(self.dtype)


class SelfAttention(nn.Module):
    """SAGAN's block: x + gamma * o(softmax(theta(x) phi(x)^T) g(x)), with phi and g
    max-pooled 2x, SN 1x1 convs, gamma starting at 0."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        key_dim, value_dim = max(c // 8, 1), max(c // 2, 1)
        conv = lambda n, f: SNConv(f, (1, 1), use_bias=False, dtype=self.dtype, name=n)
        pool = lambda t: nn.max_pool(t, (2, 2), (2, 2))
        theta = conv("theta", key_dim)(x).reshape(b, h * w, key_dim)
        phi = pool(conv("phi", key_dim)(x)).reshape(b, h * w // 4, key_dim)
        g = pool(conv("g", value_dim)(x)).reshape(b, h * w // 4, value_dim)
        logits = jnp.einsum("bqd,bkd->bqk", theta, phi).astype(jnp.float32)
        attention = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bqk,bkd->bqd", attention, g).reshape(b, h, w, value_dim)
        gamma = self.param("gamma", nn.initializers.zeros, ())
        return x + gamma.astype(self.dtype) * conv("o", c)(o)


class GBlock(nn.Module):
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, *, train: bool) -> jax.Array:
        conv = lambda n, k: SNConv(self.out_channels, k, dtype=self.dtype, name=n)
        h = nn.relu(BatchNorm(dtype=self.dtype, name="bn0")(x, cond, train=train))
        h = conv("conv0", (3, 3))(upsample_nearest(h))
        h = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(h, cond, train=train))
        h = conv("conv1", (3, 3))(h)
        return h + conv("shortcut", (1, 1))(upsample_nearest(x))


class DBlock(nn.Module):
    out_channels: int
    downsample: bool = True
    preactivation: bool = True  # False for the first block: no ReLU on the image
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda n, k: SNConv(self.out_channels, k, dtype=self.dtype, name=n)
        pool = (lambda t: nn.avg_pool(t, (2, 2), (2, 2))) if self.downsample else (lambda t: t)
        h = nn.relu(x) if self.preactivation else x
        h = conv("conv1", (3, 3))(nn.relu(conv("conv0", (3, 3))(h)))
        # BigGAN's shortcut: conv then pool after a preactivated block, pool then conv first.
        if self.preactivation:
            s = pool(conv("shortcut", (1, 1))(x))
        else:
            s = conv("shortcut", (1, 1))(pool(x))
        return pool(h) + s


class BigGenerator(nn.Module):
    """z [B, z_dim], text [B, D] -> images [B, S, S, 3] (unbounded; data is in [-1, 1])."""

    stateful_collections: ClassVar[tuple[str, ...]] = (SPECTRAL, BATCH_STATS)

    image_size: int = 32
    channels: int = 16  # the width at the output resolution
    channel_mults: Sequence[int] = (4, 4, 2, 1)  # 4x4 ... image_size (len = levels + 1)
    shared_dim: int = 128  # the shared text embedding every block's BN reads
    attention_resolution: int = 16  # 0: no self-attention
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, z: jax.Array, text: jax.Array, *, train: bool = False) -> jax.Array:
        levels = pyramid_levels(self.image_size, self.channel_mults)
        widths = [self.channels * m for m in self.channel_mults]
        # levels + 1 chunks, the first ones a unit longer when z_dim does not divide evenly
        chunks = jnp.array_split(z.astype(self.dtype), levels + 1, axis=-1)
        shared = part.Dense(self.shared_dim, dtype=self.dtype, name="shared")(
            text.astype(self.dtype)
        )
        x = SNDense(4 * 4 * widths[0], dtype=self.dtype, name="fc")(chunks[0])
        x = x.reshape(z.shape[0], 4, 4, widths[0])
        block = rematerialise.block(GBlock, self.remat)
        resolution = 4
        for i, width in enumerate(widths[1:]):
            cond = jnp.concatenate([shared, chunks[i + 1]], axis=-1)
            x = block(width, self.dtype, name=f"block{i}")(x, cond, train=train)
            resolution *= 2
            if resolution == self.attention_resolution:
                x = SelfAttention(self.dtype, name="attention")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn_out")(x, None, train=train))
        x = SNConv(3, (3, 3), dtype=self.dtype, name="to_rgb")(x)
        # Linear output, as the other GAN networks here (nets/dfgan.py says why not tanh).
        return x.astype(jnp.float32)


class BigDiscriminator(nn.Module):
    """images [B, S, S, 3], text [B, D] -> logits [B] (float32)."""

    stateful_collections: ClassVar[tuple[str, ...]] = (SPECTRAL,)

    image_size: int = 32
    channels: int = 16
    channel_mults: Sequence[int] = (1, 2, 4, 4)  # image_size ... 4x4 (len = levels + 1)
    attention_resolution: int = 16  # 0: no self-attention
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, x: jax.Array, text: jax.Array) -> jax.Array:
        pyramid_levels(self.image_size, self.channel_mults)  # a ValueError for bad sizes
        widths = [self.channels * m for m in self.channel_mults]
        block = rematerialise.block(DBlock, self.remat)
        h = block(widths[0], False, False, self.dtype, name="block0")(x.astype(self.dtype))
        resolution = self.image_size
        for i, width in enumerate(widths[1:]):
            if resolution == self.attention_resolution:
                h = SelfAttention(self.dtype, name="attention")(h)
            h = block(width, True, True, self.dtype, name=f"block{i + 1}")(h)
            resolution //= 2
        h = jnp.sum(nn.relu(h), axis=(1, 2))
        unconditional = SNDense(1, dtype=self.dtype, name="linear")(h)[:, 0]
        embed = SNDense(widths[-1], use_bias=False, dtype=self.dtype, name="embed")(
            text.astype(self.dtype)
        )
        return (unconditional + jnp.sum(embed * h, axis=-1)).astype(jnp.float32)


def build(gan: ml_collections.ConfigDict, image_size: int) -> tuple[BigGenerator, BigDiscriminator]:
    """The GAN table's factory (nets/gan_networks.py) from the `gan` config section."""
    attention = gan.get("attention_resolution", 0)
    return (
        BigGenerator(
            image_size, gan.channels, tuple(gan.g_channel_mults), gan.cond_hidden, attention
        ),
        BigDiscriminator(image_size, gan.channels, tuple(gan.d_channel_mults), attention),
    )
