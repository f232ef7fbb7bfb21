"""Flax building blocks shared by the text encoders and the networks: embeddings, residual
blocks, attention (with an optional causal key/value cache), the pre-LN transformer block,
resampling.

Images are NHWC. Every module takes a compute `dtype`; parameters stay float32.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax import partitioning as part

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


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> jax.Array:
    """Fixed 2-D sin-cos position embedding, float32 [height * width, dim], row-major.

    The MoCo v3 / big_vision layout: `[sin(y f), cos(y f), sin(x f), cos(x f)]` with
    `f_i = temperature ** (-i / (dim / 4))`, i = 0..dim/4-1, y and x the integer row and
    column. `dim` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = temperature ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)
    y, x = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    y = y.reshape(-1, 1) * freqs[None, :]
    x = x.reshape(-1, 1) * freqs[None, :]
    return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], axis=-1)


def coordinate_channels(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C + 2]: the row and column of each pixel, each in [-1, 1]
    (CoordConv, Liu et al. 2018), so the first convolution sees where it is."""
    b, h, w, _ = x.shape
    rows = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, h, dtype=x.dtype)[:, None], (h, w))
    cols = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, w, dtype=x.dtype)[None, :], (h, w))
    coords = jnp.broadcast_to(jnp.stack([rows, cols], axis=-1), (b, h, w, 2))
    return jnp.concatenate([x, coords], axis=-1)


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


def causal_mask(num_queries: int, num_keys: int, offset: int | jax.Array = 0) -> jax.Array:
    """bool [num_queries, num_keys]: query i sits at position offset + i and may attend to
    keys 0..offset + i (`offset` = how many keys came before the queries)."""
    return jnp.arange(num_keys)[None, :] <= (offset + jnp.arange(num_queries))[:, None]


ATTENTION = ("auto", "explicit", "xla", "cudnn")


def attention_implementation(dtype: jnp.dtype, head_dim: int) -> str:
    """What `attention="auto"` runs: on a GPU, cuDNN's fused (flash) kernel for the 16-bit
    dtypes and head sizes it takes, else jax.nn's XLA attention; on other accelerators
    jax.nn's XLA attention; on CPU (and in float64) the explicit softmax(q k^T) v, Flax's
    attention bit for bit, so CPU runs and their published figures reproduce. jax.nn's
    XLA attention sums in another order: equal to it within float32 round-off (tests)."""
    backend = jax.default_backend()
    if backend == "cpu" or jnp.dtype(dtype) == jnp.float64:
        return "explicit"
    fused = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
    return "cudnn" if backend == "gpu" and fused and head_dim <= 128 else "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    implementation: str = "auto",
) -> jax.Array:
    """Attention of q [B, Q, N, H] over k, v [B, K, N, H]; `mask` bool [B, N, Q, K] (True:
    attend). Logits and softmax in float32 (float64 for float64 inputs)."""
    if implementation not in ATTENTION:
        raise ValueError(f"unknown attention '{implementation}'; choose {ATTENTION}")
    if implementation == "auto":
        implementation = attention_implementation(q.dtype, q.shape[-1])
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)  # scaled first, as Flax's attention
    if implementation != "explicit":
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=1.0, implementation=implementation
        )
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention from `x` [B, Q, C] onto `context` [B, K, Dc].

    `mask` (bool, broadcastable to [B, heads, Q, K]) is True where a query may attend
    to a key. Masked keys get weight exactly zero, so their values never reach the output.
    With `zero_init_out` the output projection starts at zero (the block starts as identity
    inside a residual). With `causal`, query i also sees only keys 0..i.

    Decoding (`decode=True`, the flax lm1b pattern; needs `causal` and `cache_len`): the
    "cache" collection holds keys and values for `cache_len` positions and the next index.
    The call that creates the cache (init) attends over its own keys only; every later call
    appends its keys and values at the index and attends causally over the filled prefix.

    Fields:
      num_heads: attention heads; must divide `out_features`.
      out_features: width of the projections and of the output.
      zero_init_out: start the output projection at zero.
      causal: mask keys after each query.
      cache_len: positions in the decoding cache.
      attention: one of ATTENTION (see attention_implementation for "auto").
      dtype: compute dtype.
    """

    num_heads: int
    out_features: int
    zero_init_out: bool = False
    causal: bool = False
    cache_len: int | None = None
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        mask: jax.Array | None = None,
        *,
        decode: bool = False,
    ) -> jax.Array:
        if self.out_features % self.num_heads:
            raise ValueError(
                f"out_features={self.out_features} not divisible by num_heads={self.num_heads}"
            )
        head_dim = self.out_features // self.num_heads
        proj = functools.partial(
            part.DenseGeneral,
            (self.num_heads, head_dim),
            axes=(part.EMBED, part.HEADS, part.HEAD_DIM),
            dtype=self.dtype,
        )
        q = proj(name="query")(x)
        k = proj(name="key")(context)
        v = proj(name="value")(context)
        offset: int | jax.Array = 0
        if decode:
            # Unfilled cache slots are masked only by the causal mask.
            if not self.causal or self.cache_len is None:
                raise ValueError("decode=True needs causal=True and cache_len")
            shape = (k.shape[0], self.cache_len, self.num_heads, head_dim)
            filled = self.has_variable("cache", "cached_key")
            cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if filled:  # Not the cache's creation: append this step's keys and values.
                offset = index.value
                zero = jnp.zeros_like(offset)
                at = (zero, offset, zero, zero)
                cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, at)
                cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, at)
                index.value = offset + k.shape[1]
                k, v = cached_k.value, cached_v.value
        if self.causal:
            allowed = causal_mask(q.shape[1], k.shape[1], offset)[None, None]
            mask = allowed if mask is None else mask & allowed
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], self.num_heads, q.shape[1], k.shape[1]))
        out = dot_product_attention(q, k, v, mask, self.attention)
        return part.DenseGeneral(
            self.out_features,
            axes=(part.HEADS, part.HEAD_DIM, part.EMBED),
            axis=(-2, -1),
            kernel_init=zeros_init if self.zero_init_out else nn.initializers.lecun_normal(),
            dtype=self.dtype,
            name="out",
        )(out)


class TransformerBlock(nn.Module):
    """Pre-LN transformer block on tokens [B, T, D]:
    x + SelfAttn(LN(x)), then (with `cross_attention`) x + CrossAttn(LN(x), context),
    then x + MLP(LN(x)); dropout (train only, the 'dropout' rng) on every residual branch.

    Submodule names are those of the text encoder's and the code prior's former blocks
    ("attn", "norm2" for the MLP without cross-attention; "self_attn", "cross_attn",
    "norm3" with it): Flax derives init RNGs from names, so renaming changes the weights.

    Fields:
      num_heads: attention heads; must divide D.
      mlp_ratio: MLP hidden size = mlp_ratio * D.
      dropout: residual dropout rate.
      causal: causal self-attention.
      cross_attention: attend to `context` [B, L, Dc] at keys where `context_mask` [B, L].
      cache_len: the self-attention's decoding cache size (see MultiHeadAttention).
      dtype: compute dtype.
    """

    num_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    causal: bool = False
    cross_attention: bool = False
    cache_len: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        *,
        train: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        """`mask`: the self-attention's (see MultiHeadAttention); `decode`: use the cache."""
        width = x.shape[-1]
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        h = MultiHeadAttention(
            self.num_heads,
            width,
            causal=self.causal,
            cache_len=self.cache_len,
            dtype=self.dtype,
            name="self_attn" if self.cross_attention else "attn",
        )(h, h, mask, decode=decode)
        x = x + drop(h)
        if self.cross_attention:
            if context is None or context_mask is None:
                raise ValueError("cross_attention needs context and context_mask")
            h = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
            h = MultiHeadAttention(self.num_heads, width, dtype=self.dtype, name="cross_attn")(
                h, context, context_mask[:, None, None, :]
            )
            x = x + drop(h)
        h = nn.LayerNorm(dtype=self.dtype, name="norm3" if self.cross_attention else "norm2")(x)
        h = part.Dense(width * self.mlp_ratio, dtype=self.dtype, name="mlp_in")(h)
        h = part.Dense(width, axes=(part.MLP, part.EMBED), dtype=self.dtype, name="mlp_out")(
            nn.gelu(h)
        )
        return x + drop(h)


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
        h = part.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv1")(h)
        h = (
            h
            + part.Dense(self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))[
                :, None, None, :
            ]
        )
        h = nn.silu(group_norm(self.out_channels, self.dtype, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = part.Conv(
            self.out_channels, (3, 3), kernel_init=zeros_init, dtype=self.dtype, name="conv2"
        )(h)
        if c_in != self.out_channels:
            x = part.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class SelfAttention2D(nn.Module):
    """Pre-norm self-attention over the H*W image tokens, residual, zero-init output.

    `position` [H*W, C], when given, is added to the normalised tokens: attention alone is
    blind to where a token is."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position: jax.Array | None = None) -> jax.Array:
        b, h, w, c = x.shape
        tokens = group_norm(c, self.dtype, "norm")(x).reshape(b, h * w, c)
        if position is not None:
            tokens = tokens + position.astype(tokens.dtype)
        out = MultiHeadAttention(
            self.num_heads, c, zero_init_out=True, dtype=self.dtype, name="attn"
        )(tokens, tokens)
        return x + out.reshape(b, h, w, c)


class CrossAttention2D(nn.Module):
    """Image tokens attend to a text sequence; pre-norm, residual, zero-init output.

    `context` [B, L, D] is layer-normalised (text encoders differ in scale) and projected to
    the image width. Keys where `context_mask` [B, L] is False are ignored exactly; a row
    with no valid key adds nothing (rather than a uniform average over padding).
    `position` [H*W, C], when given, is added to the image tokens (the queries), so a
    query can ask for the words that name its place ("top left").
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        context_mask: jax.Array,
        position: jax.Array | None = None,
    ) -> jax.Array:
        b, h, w, c = x.shape
        tokens = group_norm(c, self.dtype, "norm")(x).reshape(b, h * w, c)
        if position is not None:
            tokens = tokens + position.astype(tokens.dtype)
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
        return part.Conv(
            self.out_channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype
        )(x)


def pyramid_levels(image_size: int, channel_mults) -> int:
    """The halvings from `image_size` down to 4x4 of a GAN's G or D, whose `channel_mults`
    give one width per resolution (levels + 1 of them); ValueError otherwise."""
    levels = int(math.log2(image_size)) - 2 if image_size > 0 else -1
    if image_size < 8 or 2 ** (levels + 2) != image_size:
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    if len(channel_mults) != levels + 1:
        raise ValueError(f"channel_mults needs {levels + 1} entries for {image_size}px")
    return levels


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
        return part.Conv(self.out_channels, (3, 3), dtype=self.dtype)(upsample_nearest(x))
