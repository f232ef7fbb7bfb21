"""Explicit name -> factory tables: a new network or method is one file and one line here.

Tables hold factories (not instances) and are read through `get`, which turns an unknown
name into a one-line ConfigError that lists the choices. No import-by-string.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from t2i_jax.errors import ConfigError


def _shapes_builder():
    from t2i_jax.data.shapes_builder import T2iShapes

    return T2iShapes


def _diffusion():
    from t2i_jax.methods.diffusion import Diffusion

    return Diffusion


def _transformer(text: ml_collections.ConfigDict, vocab_size: int, causal: bool = False):
    from t2i_jax.text.transformer import TransformerTextEncoder

    return TransformerTextEncoder(
        vocab_size=vocab_size,
        width=text.width,
        depth=text.depth,
        num_heads=text.num_heads,
        max_len=text.max_len,
        dropout=text.dropout,
        causal=causal,
    )


def _bag_of_words(text: ml_collections.ConfigDict, vocab_size: int):
    from t2i_jax.text.bow import BagOfWords

    return BagOfWords(vocab_size=vocab_size, width=text.width)


def _word_embedding(text: ml_collections.ConfigDict, vocab_size: int):
    from t2i_jax.text.embedding import WordEmbedding

    return WordEmbedding(vocab_size=vocab_size, width=text.width, dropout=text.dropout)


# Data sets: name -> TFDS builder class (array_record, no TensorFlow).
DATASETS: dict[str, Callable[[], Any]] = {
    "t2i_shapes": _shapes_builder,
}

# Generative families: name -> class(config, vocab_size) implementing methods.base.Method.
METHODS: dict[str, Callable[[], Any]] = {
    "diffusion": _diffusion,
}

# Text encoders: name -> (text config, vocab size) -> Flax module giving TextFeatures.
TEXT_ENCODERS: dict[str, Callable[..., Any]] = {
    "transformer": _transformer,
    "causal": lambda text, vocab_size: _transformer(text, vocab_size, causal=True),
    "bow": _bag_of_words,
    "embedding": _word_embedding,
}


def _checked(table: dict[str, Callable[..., Any]], name: str, key: str) -> Callable[..., Any]:
    if name not in table:
        raise ConfigError(f"unknown {key} '{name}'; choose from {sorted(table)}")
    return table[name]


def get(table: dict[str, Callable[[], Any]], name: str, key: str) -> Any:
    return _checked(table, name, key)()


def check_names(config: ml_collections.ConfigDict) -> None:
    """Fails on an unknown registry name before a run creates anything on disk."""
    _checked(METHODS, config.method, "method")
    _checked(DATASETS, config.data.name, "data.name")
    _checked(TEXT_ENCODERS, config.text.encoder, "text.encoder")


def build_method(config: ml_collections.ConfigDict, vocab_size: int):
    return get(METHODS, config.method, "method")(config, vocab_size)


def build_text_encoder(text: ml_collections.ConfigDict, vocab_size: int):
    return _checked(TEXT_ENCODERS, text.encoder, "text.encoder")(text, vocab_size)
