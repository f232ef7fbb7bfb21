"""Convolutional encoder and decoder for the VAE family (VAE, VQ-VAE, latent diffusion).

Encoder: conv -> per level `num_res_blocks` ResBlocks, then a stride-2 conv (except at the
last level) -> a middle ResBlock -> GN, SiLU, conv to `out_channels`. With
len(channel_mults) = n levels, a S x S image becomes an S / 2^(n-1) latent grid.
Decoder: the mirror image, nearest-neighbour upsampling + conv.

An optional condition vector `cond` [B, D] (the pooled text for a conditional VAE) enters
every ResBlock through its embedding projection, as the timestep does in the UNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import partitioning as part
from t2i_jax import remat as rematerialise
from t2i_jax.errors import ConfigError
from t2i_jax.layers import Downsample, ResBlock, Upsample, group_norm


def _condition(cond: jax.Array | None, batch: int, dtype) -> jax.Array:
    # ResBlock adds Dense(silu(emb)); an unconditional net gives it one zero feature, so
    # only the (learned) bias remains: the same block, no separate code path.
    return jnp.zeros((batch, 1), dtype) if cond is None else cond.astype(dtype)


class Encoder(nn.Module):
    """images [B, S, S, C] (and cond [B, D]) -> features [B, s, s, out_channels]."""

    channels: int = 32
    channel_mults: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 1
    out_channels: int = 8
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        emb = _condition(cond, x.shape[0], self.dtype)
        res_block = rematerialise.block(ResBlock, self.remat)
        h = part.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        for level, mult in enumerate(self.channel_mults):
            width = self.channels * mult
            for i in range(self.num_res_blocks):
                h = res_block(width, dtype=self.dtype, name=f"down{level}_res{i}")(
                    h, emb, train=False
                )
            if level < len(self.channel_mults) - 1:
                h = Downsample(width, self.dtype, name=f"down{level}_resample")(h)
        h = res_block(h.shape[-1], dtype=self.dtype, name="mid")(h, emb, train=False)
        h = nn.silu(group_norm(h.shape[-1], self.dtype, "norm_out")(h))
        h = part.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)
        return h.astype(jnp.float32)


class Decoder(nn.Module):
    """latents [B, s, s, c] (and cond [B, D]) -> [B, S, S, out_channels]."""

    channels: int = 32
    channel_mults: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 1
    out_channels: int = 3
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, z: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        emb = _condition(cond, z.shape[0], self.dtype)
        res_block = rematerialise.block(ResBlock, self.remat)
        top = self.channels * self.channel_mults[-1]
        h = part.Conv(top, (3, 3), dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        h = res_block(top, dtype=self.dtype, name="mid")(h, emb, train=False)
        for level in reversed(range(len(self.channel_mults))):
            width = self.channels * self.channel_mults[level]
            for i in range(self.num_res_blocks):
                h = res_block(width, dtype=self.dtype, name=f"up{level}_res{i}")(
                    h, emb, train=False
                )
            if level > 0:
                h = Upsample(width, self.dtype, name=f"up{level}_resample")(h)
        h = nn.silu(group_norm(h.shape[-1], self.dtype, "norm_out")(h))
        h = part.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)
        return h.astype(jnp.float32)


class LatentPrior(nn.Module):
    """A learned conditional prior p(z | text): pooled text [B, D] -> (mean, logvar), each
    [B, *latent_shape]. The last layer starts at zero, so training starts from N(0, I)."""

    latent_shape: Sequence[int]
    hidden: int = 256
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        size = 1
        for d in self.latent_shape:
            size *= d
        h = nn.silu(part.Dense(self.hidden, dtype=self.dtype, name="hidden")(text))
        out = part.Dense(2 * size, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="out")(
            h
        ).astype(jnp.float32)
        mean, logvar = jnp.split(out, 2, axis=-1)
        shape = (text.shape[0], *self.latent_shape)
        return mean.reshape(shape), logvar.reshape(shape)


def latent_side(image_size: int, channel_mults, key: str) -> int:
    """The latent grid's side: one stride-2 level between consecutive channel mults."""
    downsample = 2 ** (len(channel_mults) - 1)
    if image_size % downsample:
        raise ConfigError(
            f"data.image_size={image_size} is not divisible by {downsample} "
            f"({len(channel_mults)} levels in {key})"
        )
    return image_size // downsample


def encoder_decoder(
    section: ml_collections.ConfigDict, latent_channels: int, out_channels: int
) -> tuple[Encoder, Decoder]:
    """The conv encoder (to `latent_channels`) and decoder (to `out_channels`) of a VAE or
    VQ-VAE config section (channels, channel_mults, num_res_blocks)."""
    net = dict(
        channels=section.channels,
        channel_mults=tuple(section.channel_mults),
        num_res_blocks=section.num_res_blocks,
    )
    return Encoder(**net, out_channels=latent_channels), Decoder(**net, out_channels=out_channels)
