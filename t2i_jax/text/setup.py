"""A run's text setup: the tokenizer, the encoder module and what it was fitted or loaded with.

Every text encoder is built the same way, `text.encoders.build_text(config, context) ->
TextSetup`, so a method never knows which encoder it has: it gets a module giving
`TextFeatures`, the tokenizer's empty caption (classifier-free guidance's null text), the
pretrained params to start from (if any) and whether the encoder is frozen.

What an encoder fits or loads is stored in the run's workdir, so sampling and evaluating a
finished run need nothing else: `tokenizer.model` (SentencePiece, trained on the training
captions), `tfidf.npz` (TF-IDF statistics) or `text_encoder/` (the pretrained BERT's
config, vocabulary and weights digest; a frozen BERT's weights are in the run's frozen
store, a fine-tuned one's in its checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from t2i_jax.text.tokenizer import CaptionTokenizer, Tokenizer, prepare_tokenizer


@dataclasses.dataclass(frozen=True)
class TextContext:
    """Where an encoder finds its training corpus and keeps what it fits.

    Attributes:
      workdir: the run's directory; fitted tokenizers and statistics are stored here.
      builder: the data set's TFDS builder while training; None when reopening a run, in
        which case everything is read from the workdir.
      seed: the run's seed (random vectors of words missing from a GloVe file).
    """

    workdir: str
    builder: Any | None
    seed: int

    @property
    def training(self) -> bool:
        return self.builder is not None

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def primary(self) -> bool:
        """Process 0 writes the run's files; the others read them."""
        return jax.process_index() == 0

    def sentencepiece(self, vocab_size: int) -> Tokenizer:
        """The run's SentencePiece model: the workdir's copy, else trained on the data set."""
        path = self.path("tokenizer.model")
        if os.path.isfile(path) or not self.training:
            return Tokenizer.load(path)
        tokenizer = prepare_tokenizer(self.builder, vocab_size)
        if self.primary():
            tokenizer.save(path)
        return tokenizer

    def training_captions(self) -> list[str]:
        from t2i_jax.data import sources

        return sources.training_captions(self.builder)


@dataclasses.dataclass(frozen=True, eq=False)
class TextSetup:
    """Everything a method needs of its text encoder.

    Attributes:
      name: the registry name (`config.text.encoder`).
      encoder: Flax module, `apply({"params": p}, tokens, mask, train=...) -> TextFeatures`.
      tokenizer: encodes captions to (tokens, mask) of length `max_len`.
      max_len: the caption length of every batch.
      pretrained: params to start the encoder from (host arrays), or None for a random init.
      frozen: the encoder is not trained: its params are frozen weights (passed to the
        method apart from the train state), and its features may be read from a
        per-dataset cache instead of recomputed.
      weights_digest: sha256 of the pretrained weights (`params_digest`), for cache keys.
    """

    name: str
    encoder: nn.Module
    tokenizer: CaptionTokenizer
    max_len: int
    pretrained: Any | None = None
    frozen: bool = False
    weights_digest: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def params_digest(params) -> str:
    """sha256 over a params pytree's paths, dtypes, shapes and values."""
    h = hashlib.sha256()
    for path, leaf in sorted(
        (jax.tree_util.keystr(p), np.asarray(x))
        for p, x in jax.tree_util.tree_leaves_with_path(params)
    ):
        h.update(f"{path}:{leaf.dtype}:{leaf.shape};".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()
