"""A small CLIP-style image-text encoder: CNN image tower, transformer text tower.

Both towers end in a linear projection to a shared space; embeddings are L2-normalised, and a
learned logit scale (CLIP's temperature, initialised to 1 / 0.07 and capped at 100) multiplies
their cosine similarities in the InfoNCE loss.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.nets.probe import ConvTower
from t2i_jax.text.transformer import TransformerTextEncoder

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(log scale) at 100.


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ContrastiveEncoder(nn.Module):
    """Embeds images and captions into one space.

    Fields:
      vocab_size: SentencePiece vocabulary size of the captions' tokenizer.
      max_len: token sequence length.
      embed_dim: size of the shared embedding.
      channels, image_features: the image ConvTower.
      text_width, text_depth, text_heads: the TransformerTextEncoder (mean-pooled).
    """

    vocab_size: int
    max_len: int = 32
    embed_dim: int = 128
    channels: tuple[int, ...] = (32, 64, 128)
    image_features: int = 256
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 4

    def setup(self):
        self.image_tower = ConvTower(self.channels, self.image_features)
        self.image_proj = nn.Dense(self.embed_dim)
        self.text_tower = TransformerTextEncoder(
            vocab_size=self.vocab_size,
            width=self.text_width,
            depth=self.text_depth,
            num_heads=self.text_heads,
            max_len=self.max_len,
        )
        self.text_proj = nn.Dense(self.embed_dim)
        self.log_scale = self.param(
            "log_scale", nn.initializers.constant(math.log(1 / 0.07)), (), jnp.float32
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """float [B, H, W, 3] in [-1, 1] -> unit vectors [B, embed_dim]."""
        return _unit(self.image_proj(self.image_tower(images)))

    def encode_text(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """int32 tokens [B, L], bool mask [B, L] -> unit vectors [B, embed_dim]."""
        return _unit(self.text_proj(self.text_tower(tokens, mask).pooled))

    def logit_scale(self) -> jax.Array:
        return jnp.minimum(jnp.exp(self.log_scale), MAX_LOGIT_SCALE)

    def __call__(self, images, tokens, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(image embeddings, text embeddings, logit scale)."""
        return self.encode_image(images), self.encode_text(tokens, mask), self.logit_scale()


def info_nce(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE (CLIP): cross-entropy of image->text and text->image, averaged."""
    logits = scale * image_emb @ text_emb.T
    labels = jnp.arange(logits.shape[0])
    log_i2t = jax.nn.log_softmax(logits, axis=1)
    log_t2i = jax.nn.log_softmax(logits, axis=0)
    return -0.5 * (jnp.mean(log_i2t[labels, labels]) + jnp.mean(log_t2i[labels, labels]))
