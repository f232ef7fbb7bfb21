"""A text-conditional autoregressive transformer over VQ code sequences (DALL-E 1's prior).

Tokens are the codes 0..K-1 of the flattened (row-major) code grid, preceded by BOS = K.
Each pre-LN block: causal self-attention, cross-attention onto the text encoder's sequence
(keys masked by the caption's mask), MLP. The output is K logits per position.

Decoding with a key/value cache (`decode=True`, the flax lm1b pattern): the "cache"
collection holds each layer's keys and values for all `seq_len` positions and the next
index. `init_cache` makes it; every call then takes one token per sequence, appends its
key and value and attends over the filled prefix, so sampling n codes costs n single-token
steps instead of n full passes. Both paths compute the same function (tested).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.nets.layers import MultiHeadAttention


class CachedCausalSelfAttention(nn.Module):
    """Causal multi-head self-attention; with `decode`, over a key/value cache."""

    num_heads: int
    seq_len: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, decode: bool) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        proj = functools.partial(nn.DenseGeneral, (self.num_heads, head_dim), dtype=self.dtype)
        q, k, v = proj(name="query")(x), proj(name="key")(x), proj(name="value")(x)
        if decode:
            shape = (batch, self.seq_len, self.num_heads, head_dim)
            filled = self.has_variable("cache", "cached_key")
            cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if filled:  # Not the cache's creation: append this step's keys and values.
                start = index.value
                at = (jnp.zeros_like(start), start, jnp.zeros_like(start), jnp.zeros_like(start))
                cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, at)
                cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, at)
                index.value = start + length
                k, v = cached_k.value, cached_v.value
                query_pos = start + jnp.arange(length)
                mask = jnp.arange(self.seq_len)[None, :] <= query_pos[:, None]
            else:
                mask = jnp.tril(jnp.ones((length, length), bool))
        else:
            mask = jnp.tril(jnp.ones((length, length), bool))
        out = nn.dot_product_attention(q, k, v, mask=mask[None, None], dtype=self.dtype)
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class _Block(nn.Module):
    num_heads: int
    seq_len: int
    mlp_ratio: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, context, context_mask, *, decode: bool):
        width = x.shape[-1]
        h = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        x = x + CachedCausalSelfAttention(
            self.num_heads, self.seq_len, self.dtype, name="self_attn"
        )(h, decode=decode)
        h = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        x = x + MultiHeadAttention(self.num_heads, width, dtype=self.dtype, name="cross_attn")(
            h, context, context_mask[:, None, None, :]
        )
        h = nn.LayerNorm(dtype=self.dtype, name="norm3")(x)
        h = nn.Dense(width * self.mlp_ratio, dtype=self.dtype, name="mlp_in")(h)
        return x + nn.Dense(width, dtype=self.dtype, name="mlp_out")(nn.gelu(h))


class CodePrior(nn.Module):
    """tokens [B, T] (BOS = num_codes, then codes) at `positions` [T] -> logits [B, T, K].

    Fields:
      num_codes: K, the codebook size (BOS is token K).
      seq_len: length of a code sequence (the grid's h * w); the cache's size.
      width, depth, num_heads, mlp_ratio: the transformer's sizes.
    """

    num_codes: int
    seq_len: int
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32

    @property
    def bos(self) -> int:
        return self.num_codes

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        text_seq: jax.Array,
        text_mask: jax.Array,
        *,
        positions: jax.Array | None = None,
        decode: bool = False,
    ) -> jax.Array:
        if positions is None:
            positions = jnp.arange(tokens.shape[1])
        x = nn.Embed(self.num_codes + 1, self.width, name="token_embed")(tokens)
        pos_table = self.param(
            "pos_embed", nn.initializers.normal(0.02), (self.seq_len, self.width)
        )
        x = (x + pos_table[positions][None]).astype(self.dtype)
        context = nn.LayerNorm(dtype=self.dtype, name="context_norm")(text_seq)
        context = nn.Dense(self.width, dtype=self.dtype, name="context_proj")(context)
        for i in range(self.depth):
            x = _Block(self.num_heads, self.seq_len, self.mlp_ratio, self.dtype, name=f"block{i}")(
                x, context, text_mask.astype(bool), decode=decode
            )
        x = nn.LayerNorm(dtype=self.dtype, name="norm_out")(x)
        return nn.Dense(self.num_codes, dtype=self.dtype, name="logits")(x).astype(jnp.float32)


def init_cache(prior: CodePrior, batch: int, text_seq, text_mask) -> dict:
    """An empty key/value cache for `batch` sequences (creation fills nothing)."""
    tokens = jnp.zeros((batch, prior.seq_len), jnp.int32)
    variables = jax.eval_shape(
        lambda: prior.init(jax.random.key(0), tokens, text_seq, text_mask, decode=True)
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
