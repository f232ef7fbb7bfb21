"""Text-conditioned U-Net for diffusion (ADM-style), predicting a tensor shaped like its input."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax import partitioning as part
from t2i_jax import remat as rematerialise
from t2i_jax.layers import (
    CrossAttention2D,
    Downsample,
    ResBlock,
    SelfAttention2D,
    Upsample,
    coordinate_channels,
    group_norm,
    sincos_2d,
    timestep_embedding,
    zeros_init,
)

POSITION_EMBEDDINGS = ("none", "sincos", "learned")


class UNet(nn.Module):
    """U-Net conditioned on a timestep, a pooled text vector and a text sequence.

    Conditioning: `emb = MLP(sinusoid(t)) + Dense(text_pooled)` feeds every ResBlock
    (without the second term when not `pooled_text`);
    `text_seq` (with `text_mask`) is attended to by cross-attention at the feature-map sizes
    in `attention_resolutions` (which also get self-attention) and
    `cross_attention_resolutions`. The middle block has self- and cross-attention when
    `mid_attention`. If `text_seq` is None (encoders with only a pooled vector) the
    cross-attention layers are left out, so init and apply must agree on it.

    Fields:
      base_channels: width of the first level; level i has base_channels * channel_mults[i].
      channel_mults: one entry per resolution level; len - 1 downsamplings.
      num_res_blocks: ResBlocks per level on the way down (one more on the way up).
      attention_resolutions: feature-map sizes (H) with self- and cross-attention.
      cross_attention_resolutions: feature-map sizes (H) with cross-attention only.
      num_heads: attention heads; must divide every level's width.
      dropout: ResBlock dropout rate, active only when train=True (uses the 'dropout' rng).
      out_channels: channels of the output.
      dtype: compute dtype (params stay float32); the output is float32.
      remat: none | blocks | full (t2i_jax/remat.py).
      mid_attention: self- and cross-attention in the middle block.
      position_embedding: none | sincos | learned: a [H*W, C] position embedding added to
        the normalised image tokens of every attention layer (to the queries of cross-
        attention), fixed 2-D sin-cos or learned per layer. Without one, attention knows a
        token's place only from what the convolutions' zero padding leaves in it.
      coord_channels: append each pixel's row and column in [-1, 1] to the input.
      pooled_text: add the pooled text vector to the embedding every ResBlock reads. It
        reaches every pixel alike, so it can say which colours a caption names but not which
        object takes which; without it the caption arrives only through cross-attention,
        which reads it per pixel (needs `text_seq`).
    """

    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    cross_attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    dropout: float = 0.0
    out_channels: int = 3
    dtype: jnp.dtype = jnp.float32
    mid_attention: bool = True
    remat: str = "none"
    position_embedding: str = "none"
    coord_channels: bool = False
    pooled_text: bool = True

    def _position(self, prefix: str, h: jax.Array) -> jax.Array | None:
        """The position embedding of the attention layers named `prefix`, [H*W, C]."""
        _, height, width, channels = h.shape
        if self.position_embedding == "sincos":
            return sincos_2d(height, width, channels)
        if self.position_embedding == "learned":  # big_vision's "learn" init
            init = part.annotated(nn.initializers.normal(channels**-0.5), part.EMBED_AXES)
            return self.param(f"{prefix}_position", init, (height * width, channels))
        if self.position_embedding != "none":
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, "
                f"got {self.position_embedding!r}"
            )
        return None

    def _attend(
        self,
        h: jax.Array,
        text_seq: jax.Array | None,
        text_mask: jax.Array,
        prefix: str,
        force: bool = False,
    ) -> jax.Array:
        """The attention layers this resolution asks for (all of them when `force`)."""
        res = h.shape[1]
        full = force or res in self.attention_resolutions
        cross = text_seq is not None and (full or res in self.cross_attention_resolutions)
        position = self._position(prefix, h) if full or cross else None
        if full:
            h = rematerialise.block(SelfAttention2D, self.remat)(
                self.num_heads, dtype=self.dtype, name=f"{prefix}_self_attn"
            )(h, position)
        if cross:
            h = rematerialise.block(CrossAttention2D, self.remat)(
                self.num_heads, dtype=self.dtype, name=f"{prefix}_cross_attn"
            )(h, text_seq, text_mask, position)
        return h

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        text_seq: jax.Array | None,
        text_mask: jax.Array,
        text_pooled: jax.Array,
        *,
        train: bool,
    ) -> jax.Array:
        """x [B, H, W, C], t [B], text_seq [B, L, D] or None, text_mask bool [B, L],
        text_pooled [B, D] -> float32 [B, H, W, out_channels]."""
        levels = len(self.channel_mults)
        if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(f"H, W of {x.shape} must be divisible by 2**{levels - 1}")
        emb_dim = 4 * self.base_channels
        emb = timestep_embedding(t, self.base_channels)
        emb = part.Dense(emb_dim, dtype=self.dtype, name="time_in")(emb)
        emb = part.Dense(emb_dim, dtype=self.dtype, name="time_out")(nn.silu(emb))
        if self.pooled_text:
            emb = emb + part.Dense(emb_dim, dtype=self.dtype, name="pooled_proj")(text_pooled)
        elif text_seq is None:
            raise ValueError("pooled_text=False with no text_seq leaves the UNet no text")
        res_block = functools.partial(
            rematerialise.block(ResBlock, self.remat), dropout=self.dropout, dtype=self.dtype
        )

        if self.coord_channels:
            x = coordinate_channels(x)
        h = part.Conv(self.base_channels, (3, 3), dtype=self.dtype, name="conv_in")(
            x.astype(self.dtype)
        )
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            ch = self.base_channels * mult
            for i in range(self.num_res_blocks):
                h = res_block(ch, name=f"down{level}_{i}_res")(h, emb, train=train)
                h = self._attend(h, text_seq, text_mask, f"down{level}_{i}")
                skips.append(h)
            if level != levels - 1:
                h = Downsample(ch, dtype=self.dtype, name=f"down{level}_downsample")(h)
                skips.append(h)

        ch = h.shape[-1]
        h = res_block(ch, name="mid_res0")(h, emb, train=train)
        if self.mid_attention:
            h = self._attend(h, text_seq, text_mask, "mid", force=True)
        h = res_block(ch, name="mid_res1")(h, emb, train=train)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            ch = self.base_channels * mult
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(ch, name=f"up{level}_{i}_res")(h, emb, train=train)
                h = self._attend(h, text_seq, text_mask, f"up{level}_{i}")
            if level != 0:
                h = Upsample(ch, dtype=self.dtype, name=f"up{level}_upsample")(h)

        h = nn.silu(group_norm(h.shape[-1], self.dtype, "norm_out")(h))
        h = part.Conv(
            self.out_channels, (3, 3), kernel_init=zeros_init, dtype=self.dtype, name="conv_out"
        )(h)
        return h.astype(jnp.float32)
