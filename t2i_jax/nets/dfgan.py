"""DF-GAN (Tao et al. 2022) generator and discriminator, sized by the image resolution.

Generator: z -> Dense -> 4x4 map; per upsampling block, two deep text-image fusion blocks
(DFBlock: per-channel affine whose scale and shift are MLPs of the condition, then
LeakyReLU) around 3x3 convs, with a 1x1 shortcut; LeakyReLU, 3x3 conv to RGB, linear (no
tanh, unlike DF-GAN: see the generator).
The condition is [z, sentence vector], as in DF-GAN.

Discriminator: 3x3 conv, then residual downsampling blocks (4x4 stride-2 conv and 3x3 conv
with a learned residual gain starting at 0; the shortcut is 1x1 conv + 2x2 average pool)
down to 4x4, then the text-conditional head (`gan_heads.ConditionalHead`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import partitioning as part
from t2i_jax import remat as rematerialise
from t2i_jax.layers import pyramid_levels, upsample_nearest
from t2i_jax.nets.gan_heads import ConditionalHead


class Affine(nn.Module):
    """x * gamma(c) + beta(c), with gamma starting at 1 and beta at 0 (DF-GAN's init)."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        channels = x.shape[-1]

        def mlp(name: str, bias_init):
            h = nn.relu(part.Dense(self.hidden, dtype=self.dtype, name=f"{name}_hidden")(cond))
            return part.Dense(
                channels,
                kernel_init=nn.initializers.zeros,
                bias_init=bias_init,
                dtype=self.dtype,
                name=name,
            )(h)

        gamma = mlp("gamma", nn.initializers.ones)
        beta = mlp("beta", nn.initializers.zeros)
        return x * gamma[:, None, None, :] + beta[:, None, None, :]


class DFBlock(nn.Module):
    """Two (affine, LeakyReLU) fusions: DF-GAN's deep text-image fusion."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        x = nn.leaky_relu(Affine(self.hidden, self.dtype, name="affine0")(x, cond), 0.2)
        return nn.leaky_relu(Affine(self.hidden, self.dtype, name="affine1")(x, cond), 0.2)


class GBlock(nn.Module):
    out_channels: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = upsample_nearest(x)
        conv = lambda n: part.Conv(self.out_channels, (3, 3), dtype=self.dtype, name=n)
        r = conv("conv0")(DFBlock(self.hidden, self.dtype, name="fuse0")(x, cond))
        r = conv("conv1")(DFBlock(self.hidden, self.dtype, name="fuse1")(r, cond))
        if c != self.out_channels:
            x = part.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="shortcut")(x)
        return x + r


class DFGenerator(nn.Module):
    """z [B, z_dim], text [B, D] -> images [B, S, S, 3] (unbounded; data is in [-1, 1])."""

    image_size: int = 32
    channels: int = 32  # the width at the output resolution; x2 per level up to `mults`
    channel_mults: Sequence[int] = (4, 4, 2, 1)  # 4x4 ... image_size (len = levels + 1)
    cond_hidden: int = 128
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, z: jax.Array, text: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # No dropout or batch statistics.
        pyramid_levels(self.image_size, self.channel_mults)  # a ValueError for bad sizes
        widths = [self.channels * m for m in self.channel_mults]
        cond = jnp.concatenate([z, text], axis=-1).astype(self.dtype)
        x = part.Dense(4 * 4 * widths[0], dtype=self.dtype, name="fc")(z.astype(self.dtype))
        x = x.reshape(z.shape[0], 4, 4, widths[0])
        block = rematerialise.block(GBlock, self.remat)
        for i, width in enumerate(widths[1:]):
            x = block(width, self.cond_hidden, self.dtype, name=f"block{i}")(x, cond)
        x = part.Conv(3, (3, 3), dtype=self.dtype, name="to_rgb")(nn.leaky_relu(x, 0.2))
        # Linear output (StyleGAN2's choice, not DF-GAN's tanh): flat saturated colours ask
        # tanh for unbounded pre-activations, its gradient vanishes and G stops learning
        # within a few hundred steps. D keeps fakes in range; sampling clips to [-1, 1].
        return x.astype(jnp.float32)


class DBlock(nn.Module):
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        r = part.Conv(
            self.out_channels, (4, 4), strides=2, padding=1, dtype=self.dtype, name="down"
        )
        r = nn.leaky_relu(r(x), 0.2)
        r = part.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv")(r)
        r = nn.leaky_relu(r, 0.2)
        s = part.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="shortcut")(x)
        s = nn.avg_pool(s, (2, 2), (2, 2))
        gain = self.param("gain", nn.initializers.zeros, ())
        return s + gain * r


class DFDiscriminator(nn.Module):
    """images [B, S, S, 3], text [B, D] -> logits [B]."""

    image_size: int = 32
    channels: int = 32
    channel_mults: Sequence[int] = (1, 2, 4, 4)  # image_size ... 4x4 (len = levels + 1)
    conditioning: str = "concat"
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, x: jax.Array, text: jax.Array) -> jax.Array:
        pyramid_levels(self.image_size, self.channel_mults)  # a ValueError for bad sizes
        widths = [self.channels * m for m in self.channel_mults]
        h = part.Conv(widths[0], (3, 3), dtype=self.dtype, name="from_rgb")(x.astype(self.dtype))
        for i, width in enumerate(widths[1:]):
            h = rematerialise.block(DBlock, self.remat)(width, self.dtype, name=f"block{i}")(h)
        return ConditionalHead(self.conditioning, dtype=self.dtype, name="head")(h, text)


def build(gan: ml_collections.ConfigDict, image_size: int) -> tuple[DFGenerator, DFDiscriminator]:
    """The GAN table's factory (nets/gan_networks.py) from the `gan` config section."""
    return (
        DFGenerator(image_size, gan.channels, tuple(gan.g_channel_mults), gan.cond_hidden),
        DFDiscriminator(image_size, gan.channels, tuple(gan.d_channel_mults), gan.conditioning),
    )
