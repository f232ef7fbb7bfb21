"""Text features and text encoders."""

from t2i_jax.text.sentence_encoder import load_sentence_encoder

__all__ = ["load_sentence_encoder"]
