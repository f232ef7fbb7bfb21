"""The output every text encoder returns."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class TextFeatures:
    """Encoded text: per-token features, a pooled vector and the token mask.

    Attributes:
      seq: [B, L, D] per-token features, or None for encoders without a sequence
        (bag-of-words, TF-IDF).
      pooled: [B, D] one vector per caption.
      mask: bool [B, L], True at valid (non-padding) tokens.
    """

    seq: jax.Array | None
    pooled: jax.Array
    mask: jax.Array
