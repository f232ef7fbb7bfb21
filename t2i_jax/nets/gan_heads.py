"""Text conditioning of a discriminator's last features: concatenation or projection.

concat      DF-GAN / GAN-INT-CLS: the sentence vector is tiled over the final feature map,
            concatenated, and a conv stack reads the logit from both.
projection  Miyato & Koyama 2018: logit = psi(h) + <V t, h>, with h the globally
            sum-pooled features and V a learned projection of the text vector t.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax import partitioning as part

CONDITIONINGS = ("concat", "projection")


class ConditionalHead(nn.Module):
    """features [B, h, w, C] and text [B, D] -> logits [B] (float32, or float64 for a
    float64 `dtype`)."""

    conditioning: str = "concat"
    text_width: int = 128  # the text vector is first mapped to this width
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, text: jax.Array) -> jax.Array:
        channels = features.shape[-1]
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)
        t = part.Dense(self.text_width, dtype=self.dtype, name="text_proj")(text)
        if self.conditioning == "concat":
            tiled = jnp.broadcast_to(
                t[:, None, None, :], features.shape[:3] + (self.text_width,)
            ).astype(features.dtype)
            h = jnp.concatenate([features, tiled], axis=-1)
            h = part.Conv(channels, (3, 3), dtype=self.dtype, name="joint_conv")(h)
            h = nn.leaky_relu(h, 0.2)
            h = part.Conv(1, h.shape[1:3], padding="VALID", dtype=self.dtype, name="logit")(h)
            return h.reshape(h.shape[0]).astype(out_dtype)
        if self.conditioning == "projection":
            h = jnp.sum(nn.leaky_relu(features, 0.2), axis=(1, 2))
            unconditional = part.Dense(1, dtype=self.dtype, name="psi")(h)[:, 0]
            embed = part.Dense(channels, dtype=self.dtype, name="embed")(nn.leaky_relu(t, 0.2))
            return (unconditional + jnp.sum(embed * h, axis=-1)).astype(out_dtype)
        raise ValueError(f"unknown conditioning '{self.conditioning}'; choose {CONDITIONINGS}")
