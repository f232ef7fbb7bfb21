"""Building blocks shared by the networks: embeddings, residual blocks, attention, resampling.

Images are NHWC. Every module takes a compute `dtype`; parameters stay float32.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

zeros_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly continuous) timesteps, [B] -> float32 [B, dim].

    Layout follows ADM / DDPM: `[cos(t * f), sin(t * f)]` with frequencies
    `f_i = max_period ** (-i / half)`, i = 0..half-1; an odd `dim` gets one zero column.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def num_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= max_groups that divides `channels` into groups of >= 2.

    Groups of one channel would be instance norm, which erases the per-channel shift a
    ResBlock adds from the conditioning embedding just before its second norm.
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    for g in range(min(max_groups, channels // 2), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int, dtype: jnp.dtype, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm with num_groups(channels) groups (statistics reduced in float32)."""
    return nn.GroupNorm(num_groups=num_groups(channels), epsilon=1e-5, dtype=dtype, name=name)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention from `x` [B, Q, C] onto `context` [B, K, Dc].

    `mask` (bool, broadcastable to [B, heads, Q, K]) is True where a query may attend
    to a key. Masked keys get weight exactly zero, so their values never reach the output.
    With `zero_init_out` the output projection starts at zero (the block starts as identity
    inside a residual).
    """

    num_heads: int
    out_features: int
    zero_init_out: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        if self.out_features % self.num_heads:
            raise ValueError(
                f"out_features={self.out_features} not divisible by num_heads={self.num_heads}"
            )
        head_dim = self.out_features // self.num_heads
        proj = functools.partial(nn.DenseGeneral, (self.num_heads, head_dim), dtype=self.dtype)
        q = proj(name="query")(x)
        k = proj(name="key")(context)
        v = proj(name="value")(context)
        out = nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            deterministic=True,
            dtype=self.dtype,
            # Softmax in float32 keeps low-precision compute stable.
            force_fp32_for_softmax=self.dtype != jnp.float32,
        )
        return nn.DenseGeneral(
            self.out_features,
            axis=(-2, -1),
            kernel_init=zeros_init if self.zero_init_out else nn.initializers.lecun_normal(),
            dtype=self.dtype,
            name="out",
        )(out)


class ResBlock(nn.Module):
    """GN -> SiLU -> Conv3x3 -> + Dense(emb) -> GN -> SiLU -> Dropout -> Conv3x3 (zero init).

    The skip path is a 1x1 conv when the channel count changes, identity otherwise.
    """

    out_channels: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool) -> jax.Array:
        c_in = x.shape[-1]
        h = nn.silu(group_norm(c_in, self.dtype, "norm1")(x))
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv1")(h)
        h = (
            h
            + nn.Dense(self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))[
                :, None, None, :
            ]
        )
        h = nn.silu(group_norm(self.out_channels, self.dtype, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(
            self.out_channels, (3, 3), kernel_init=zeros_init, dtype=self.dtype, name="conv2"
        )(h)
        if c_in != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class SelfAttention2D(nn.Module):
    """Pre-norm self-attention over the H*W image tokens, residual, zero-init output."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = group_norm(c, self.dtype, "norm")(x).reshape(b, h * w, c)
        out = MultiHeadAttention(
            self.num_heads, c, zero_init_out=True, dtype=self.dtype, name="attn"
        )(tokens, tokens)
        return x + out.reshape(b, h, w, c)


class CrossAttention2D(nn.Module):
    """Image tokens attend to a text sequence; pre-norm, residual, zero-init output.

    `context` [B, L, D] is layer-normalised (text encoders differ in scale) and projected to
    the image width. Keys where `context_mask` [B, L] is False are ignored exactly; a row
    with no valid key adds nothing (rather than a uniform average over padding).
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = group_norm(c, self.dtype, "norm")(x).reshape(b, h * w, c)
        context = nn.LayerNorm(dtype=self.dtype, name="context_norm")(context)
        context_mask = context_mask.astype(bool)
        out = MultiHeadAttention(
            self.num_heads, c, zero_init_out=True, dtype=self.dtype, name="attn"
        )(tokens, context, context_mask[:, None, None, :])
        out = jnp.where(jnp.any(context_mask, axis=-1)[:, None, None], out, 0)
        return x + out.reshape(b, h, w, c)


class Downsample(nn.Module):
    """Halve H and W with a 3x3 conv of stride 2 (padding 1)."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(
            self.out_channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype
        )(x)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C] by repetition. (jax.image.resize's "nearest" is a
    gather whose gradient is a scatter, many times slower on CPU.)"""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(upsample_nearest(x))
