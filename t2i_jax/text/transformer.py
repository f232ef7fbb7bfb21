"""A small pre-LayerNorm transformer text encoder, trained from scratch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.nets.layers import MultiHeadAttention
from t2i_jax.text.features import TextFeatures


class _Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)); dropout on both residual branches."""

    num_heads: int
    mlp_ratio: int
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, attn_mask: jax.Array, *, train: bool) -> jax.Array:
        width = x.shape[-1]
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        h = MultiHeadAttention(self.num_heads, width, dtype=self.dtype, name="attn")(
            h, h, attn_mask
        )
        x = x + drop(h)
        h = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        h = nn.Dense(width * self.mlp_ratio, dtype=self.dtype, name="mlp_in")(h)
        h = nn.Dense(width, dtype=self.dtype, name="mlp_out")(nn.gelu(h))
        return x + drop(h)


class TransformerTextEncoder(nn.Module):
    """Token + learned position embeddings, `depth` pre-LN blocks, a final LayerNorm.

    Queries attend only to valid keys (`mask`), and with `causal` only to keys at or before
    them, so padding never changes the outputs at valid positions. `seq` is the final hidden
    state (zero at padded positions), `pooled` its mean over valid positions.

    Fields:
      vocab_size: number of token ids.
      width: hidden size D of the outputs.
      depth: number of transformer blocks.
      num_heads: attention heads; must divide `width`.
      max_len: the longest token sequence (size of the position table).
      mlp_ratio: MLP hidden size = mlp_ratio * width.
      dropout: residual dropout rate, active only when train=True (uses the 'dropout' rng).
      causal: also mask keys after each query (left-to-right encoder).
      dtype: compute dtype (params stay float32); outputs are float32.
    """

    vocab_size: int
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    max_len: int = 32
    mlp_ratio: int = 4
    dropout: float = 0.0
    causal: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False) -> TextFeatures:
        """tokens int32 [B, L], mask bool [B, L] -> TextFeatures(seq [B, L, D], pooled [B, D])."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        mask = mask.astype(bool)
        x = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.initializers.normal(0.02),
            name="token_embed",
        )(tokens)
        pos = self.param(
            "pos_embed", nn.initializers.normal(0.02), (self.max_len, self.width), jnp.float32
        )
        x = (x + pos[None, :length]).astype(self.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)

        allowed = mask[:, None, :]  # [B, 1(query), L(key)]
        if self.causal:
            allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None]
        # Every query may also see itself, so no row is fully masked (padded queries would
        # otherwise attend uniformly to everything); valid queries are unaffected.
        allowed = allowed | jnp.eye(length, dtype=bool)[None]
        attn_mask = allowed[:, None]  # [B, 1(head), L, L]

        for i in range(self.depth):
            x = _Block(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name=f"block{i}")(
                x, attn_mask, train=train
            )
        x = nn.LayerNorm(dtype=self.dtype, name="norm_out")(x).astype(jnp.float32)

        valid = mask[..., None]
        seq = jnp.where(valid, x, 0.0)
        count = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
        pooled = jnp.sum(seq, axis=1) / count
        return TextFeatures(seq=seq, pooled=pooled, mask=mask)
