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

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax import partitioning as part
from t2i_jax import remat as rematerialise
from t2i_jax.layers import TransformerBlock


class CodePrior(nn.Module):
    """tokens [B, T] (BOS = num_codes, then codes) at `positions` [T] -> logits [B, T, K].

    Fields:
      num_codes: K, the codebook size (BOS is token K).
      seq_len: length of a code sequence (the grid's h * w); the cache's size.
      width, depth, num_heads, mlp_ratio: the transformer's sizes.
      dtype: compute dtype; remat: none | blocks | full (t2i_jax/remat.py).
    """

    num_codes: int
    seq_len: int
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

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
        x = part.Embed(self.num_codes + 1, self.width, name="token_embed")(tokens)
        pos_table = self.param(
            "pos_embed",
            part.annotated(nn.initializers.normal(0.02), (None, part.EMBED)),
            (self.seq_len, self.width),
        )
        x = (x + pos_table[positions][None]).astype(self.dtype)
        context = nn.LayerNorm(dtype=self.dtype, name="context_norm")(text_seq)
        context = part.Dense(self.width, dtype=self.dtype, name="context_proj")(context)
        for i in range(self.depth):
            x = rematerialise.block(TransformerBlock, self.remat)(
                self.num_heads,
                self.mlp_ratio,
                causal=True,
                cross_attention=True,
                cache_len=self.seq_len,
                dtype=self.dtype,
                name=f"block{i}",
            )(x, None, context, text_mask.astype(bool), decode=decode)
        x = nn.LayerNorm(dtype=self.dtype, name="norm_out")(x)
        return part.Dense(self.num_codes, dtype=self.dtype, name="logits")(x).astype(jnp.float32)


def init_cache(prior: CodePrior, batch: int, text_seq, text_mask) -> dict:
    """An empty key/value cache for `batch` sequences (creation fills nothing)."""
    tokens = jnp.zeros((batch, prior.seq_len), jnp.int32)
    variables = jax.eval_shape(
        lambda: prior.init(jax.random.key(0), tokens, text_seq, text_mask, decode=True)
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
