"""A small pre-LayerNorm transformer text encoder, trained from scratch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import partitioning as part
from t2i_jax import remat as rematerialise
from t2i_jax.layers import TransformerBlock
from t2i_jax.text.features import TextFeatures
from t2i_jax.text.setup import TextContext, TextSetup


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
      remat: none | blocks | full (t2i_jax/remat.py).
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
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False) -> TextFeatures:
        """tokens int32 [B, L], mask bool [B, L] -> TextFeatures(seq [B, L, D], pooled [B, D])."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        mask = mask.astype(bool)
        x = part.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.initializers.normal(0.02),
            name="token_embed",
        )(tokens)
        pos = self.param(
            "pos_embed",
            part.annotated(nn.initializers.normal(0.02), (None, part.EMBED)),
            (self.max_len, self.width),
            jnp.float32,
        )
        x = (x + pos[None, :length]).astype(self.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)

        # Every query may also see itself, so no row is fully masked (padded queries would
        # otherwise attend uniformly to everything); valid queries are unaffected. The
        # blocks add the causal mask, which keeps the diagonal.
        allowed = mask[:, None, :] | jnp.eye(length, dtype=bool)[None]  # [B, L(query), L(key)]
        attn_mask = allowed[:, None]  # [B, 1(head), L, L]

        for i in range(self.depth):
            x = rematerialise.block(TransformerBlock, self.remat)(
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                causal=self.causal,
                dtype=self.dtype,
                name=f"block{i}",
            )(x, attn_mask, train=train)
        x = nn.LayerNorm(dtype=self.dtype, name="norm_out")(x).astype(jnp.float32)

        valid = mask[..., None]
        seq = jnp.where(valid, x, 0.0)
        count = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
        pooled = jnp.sum(seq, axis=1) / count
        return TextFeatures(seq=seq, pooled=pooled, mask=mask)


def build_transformer(text: ml_collections.ConfigDict, ctx: TextContext, causal: bool = False):
    """Bidirectional (or, with `causal`, GPT-style) transformer trained from scratch."""
    tokenizer = ctx.sentencepiece(text.vocab_size)
    encoder = TransformerTextEncoder(
        vocab_size=tokenizer.vocab_size,
        width=text.width,
        depth=text.depth,
        num_heads=text.num_heads,
        max_len=text.max_len,
        dropout=text.dropout,
        causal=causal,
    )
    return TextSetup("causal" if causal else "transformer", encoder, tokenizer, text.max_len)


def build_causal(text: ml_collections.ConfigDict, ctx: TextContext):
    return build_transformer(text, ctx, causal=True)
