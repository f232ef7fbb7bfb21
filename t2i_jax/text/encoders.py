"""The text encoder table: `text.encoder` -> its factory, (text config, TextContext) ->
TextSetup. Each factory lives beside its encoder module; a new encoder is one module
(network + factory) and one line here.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from t2i_jax.config import choose
from t2i_jax.text import bow, embedding, pretrained_bert, transformer
from t2i_jax.text.setup import TextContext, TextSetup

Factory = Callable[[ml_collections.ConfigDict, TextContext], TextSetup]

TEXT_ENCODERS: dict[str, Factory] = {
    "transformer": transformer.build_transformer,
    "causal": transformer.build_causal,
    "bow": bow.build_bow,
    "tfidf": bow.build_tfidf,
    "embedding": embedding.build_word_embedding,
    "bert": pretrained_bert.build_bert,
}


def build_text(config: ml_collections.ConfigDict, ctx: TextContext) -> TextSetup:
    """The run's TextSetup for `config.text.encoder`."""
    return choose(TEXT_ENCODERS, config.text.encoder, "text.encoder")(config.text, ctx)
