"""SentencePiece tokenizer trained on the training captions.

Every encoded caption ends with EOS, so even the empty caption (used for classifier-free
guidance) has one valid token and attention never sees an all-masked row.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import jax
import numpy as np
import sentencepiece as spm

from t2i_jax.data import sources
from t2i_jax.errors import DataError

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2


class CaptionTokenizer(Protocol):
    """What the pipeline, the methods and the samplers need of a tokenizer.

    Implemented by the SentencePiece `Tokenizer` below and by BERT's
    `text.wordpiece.WordPieceTokenizer`.
    """

    @property
    def vocab_size(self) -> int: ...

    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """int32 tokens [N, max_len] and bool mask [N, max_len]; an empty caption fails."""

    def empty(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The empty caption (classifier-free guidance's null text), [1, max_len] each."""

    def digest(self) -> str:
        """sha256 of everything that decides the ids (cache keys)."""

    def unknown_characters(self, caption: str) -> list[str]:
        """The caption's characters (in order, once each) that encode as unknown."""


class Tokenizer:
    """A SentencePiece model plus the fixed-length (tokens, mask) encoding of the batch."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns int32 tokens [N, max_len] and bool mask [N, max_len]; EOS always kept."""
        tokens = np.full((len(captions), max_len), PAD_ID, np.int32)
        for row, ids in enumerate(self._sp.encode(list(captions))):
            ids = ids[: max_len - 1] + [EOS_ID]  # Truncate, but keep the EOS.
            tokens[row, : len(ids)] = ids
        return tokens, tokens != PAD_ID

    def empty(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """[EOS, PAD, ...]: one valid token, so no attention row is ever fully masked."""
        return self.encode([""], max_len)

    def digest(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()

    def unknown_characters(self, caption: str) -> list[str]:
        seen = dict.fromkeys(ch for ch in caption if not ch.isspace())
        return [ch for ch in seen if UNK_ID in self._sp.encode(ch)]

    def decode(self, tokens: np.ndarray) -> list[str]:
        rows = np.atleast_2d(np.asarray(tokens))
        ids = [[int(t) for t in row if t not in (PAD_ID, EOS_ID)] for row in rows]
        return self._sp.decode(ids)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, path)  # Atomic: a killed run never leaves half a model.

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        if not os.path.isfile(path):
            raise DataError(f"tokenizer model not found: {path}")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto)
        except (RuntimeError, OSError) as e:
            raise DataError(f"cannot read tokenizer model {path}: {e}") from e


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a BPE SentencePiece model; deterministic for the same captions."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        eos_id=EOS_ID,
        bos_id=-1,
        character_coverage=1.0,
        # Small caption vocabularies have fewer pieces than a large vocab_size asks for.
        hard_vocab_limit=False,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return Tokenizer(model.getvalue())


def prepare_tokenizer(builder, vocab_size: int) -> Tokenizer:
    """Trains (once) and loads the SentencePiece model of this data set and vocab size."""
    path = os.path.join(builder.data_dir, f"spm_vocab{vocab_size}.model")
    if jax.process_index() == 0 and not os.path.isfile(path):
        train_tokenizer(sources.training_captions(builder), vocab_size).save(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"tokenizer {path}")
    return Tokenizer.load(path)
