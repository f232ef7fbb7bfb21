"""Word-embedding text encoder: learned token embeddings, optionally started from GloVe.

`glove_init` reads a GloVe or word2vec text file ("word v1 v2 ...", a word2vec header
"N D" on the first line is skipped) and builds the initial embedding matrix for the
tokenizer's pieces. A piece is looked up as a word with SentencePiece's word-start mark "▁"
stripped and lower-cased (then as written, for cased files). Pieces inside a word are looked
up too and may match an unrelated word; a caption-trained vocabulary is mostly whole words.

Special tokens are not looked up: PAD gets zeros (it is never read: padded positions are
zeroed by the mask), UNK and EOS get seeded random vectors like missing words, so they start
distinct and learnable (EOS is the only token of the empty caption, whose pooled feature is
then the EOS vector rather than zero).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece as spm

from t2i_jax import partitioning as part
from t2i_jax import rng
from t2i_jax.errors import DataError
from t2i_jax.text.features import TextFeatures
from t2i_jax.text.setup import TextContext, TextSetup
from t2i_jax.text.tokenizer import PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

WORD_START = "\u2581"  # SentencePiece's "▁".


def matrix_init(matrix: np.ndarray) -> Callable[..., jax.Array]:
    """An `embedding_init` returning `matrix` (e.g. from `glove_init`); checks the shape."""
    matrix = np.asarray(matrix, np.float32)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        del key
        if tuple(shape) != matrix.shape:
            raise ValueError(f"embedding matrix has shape {matrix.shape}, the table {shape}")
        return jnp.asarray(matrix, dtype)

    return init


class WordEmbedding(nn.Module):
    """Learned token embeddings: `seq` is the embedding of each token, `pooled` their mean.

    `seq` is zero at padded positions and `pooled` is the mean over valid positions, so
    changing padded tokens changes no output.

    Fields:
      vocab_size: number of token ids.
      width: embedding size D.
      embedding_init: initializer of the [vocab_size, width] table; `matrix_init(m)` starts
        it from a given matrix (e.g. `glove_init`'s).
      dropout: dropout on the token embeddings, active only when train=True (uses the
        'dropout' rng).
      dtype, remat: unused (a table lookup has no matmul and no blocks); declared, as
        by every network, for `remat.configure`.
    """

    vocab_size: int
    width: int = 128
    embedding_init: Callable[..., jax.Array] = nn.initializers.normal(0.02)
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False) -> TextFeatures:
        """tokens int32 [B, L], mask bool [B, L] -> TextFeatures(seq [B, L, D], pooled [B, D])."""
        mask = jnp.asarray(mask).astype(bool)
        x = part.Embed(
            self.vocab_size, self.width, embedding_init=self.embedding_init, name="embed"
        )(tokens)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        valid = mask[..., None]
        seq = jnp.where(valid, x, 0.0).astype(jnp.float32)
        count = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
        return TextFeatures(seq=seq, pooled=jnp.sum(seq, axis=1) / count, mask=mask)


def _read_vectors(path: str, width: int, wanted: set[str]) -> tuple[dict[str, np.ndarray], float]:
    """Vectors of the `wanted` words (first occurrence) and the std of all the file's values."""
    found: dict[str, np.ndarray] = {}
    total, total_sq, num_values = 0.0, 0.0, 0
    dim = None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not UTF-8 ({e})") from e
            if not line:
                continue
            if dim is None:
                fields = line.split()
                if line_no == 1 and len(fields) == 2 and all(s.isdigit() for s in fields):
                    header_dim = int(fields[1])  # word2vec header "N D".
                    if header_dim != width:
                        raise DataError(f"{path}: vectors have dimension {header_dim}, not {width}")
                    dim = header_dim
                    continue
                dim = len(fields) - 1
                if dim != width:
                    raise DataError(
                        f"{path}, line {line_no}: vectors have dimension {dim}, not {width}"
                    )
            # Split from the right: a few GloVe words (840B) contain spaces.
            fields = line.rsplit(None, dim)
            if len(fields) != dim + 1:
                raise DataError(
                    f"{path}, line {line_no}: expected a word and {dim} numbers, "
                    f"got {len(fields)} fields"
                )
            try:
                vector = np.array([float(v) for v in fields[1:]], np.float64)
            except ValueError as e:
                raise DataError(f"{path}, line {line_no}: {e}") from e
            if not np.isfinite(vector).all():
                raise DataError(f"{path}, line {line_no}: non-finite value")
            total += float(vector.sum())
            total_sq += float(np.dot(vector, vector))
            num_values += dim
            if fields[0] in wanted and fields[0] not in found:
                found[fields[0]] = vector
    if num_values == 0:
        raise DataError(f"{path}: no word vectors")
    mean = total / num_values
    return found, math.sqrt(max(total_sq / num_values - mean * mean, 0.0))


def glove_init(path: str, tokenizer: Tokenizer, width: int, *, seed: int) -> tuple[np.ndarray, int]:
    """Initial embedding matrix for `tokenizer`'s pieces from a GloVe / word2vec text file.

    Each piece takes the vector of its word (see the module docstring); a piece whose word
    is not in the file, or is empty (the lone "▁"), gets a random normal vector with the
    std of all the file's values, drawn from `seed`; PAD is zero, UNK and EOS are random.
    The random draws do not depend on which pieces are missing, so the same seed gives the
    same vector to a piece whatever the file holds.

    Returns:
      (matrix float32 [vocab_size, width], number of missing pieces, specials excluded);
      the count is also logged.

    Raises:
      DataError: the file is missing, its dimension is not `width`, or a line is malformed
        (the message names the line).
    """
    if not os.path.isfile(path):
        raise DataError(f"word-vector file not found: {path}")
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    vocab_size = sp.get_piece_size()
    special = {i for i in range(vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
    special.add(PAD_ID)
    candidates: dict[int, list[str]] = {}
    for i in range(vocab_size):
        if i in special:
            continue
        piece = sp.id_to_piece(i).removeprefix(WORD_START)
        candidates[i] = [w for w in dict.fromkeys((piece.lower(), piece)) if w]
    wanted = {w for words in candidates.values() for w in words}
    found, std = _read_vectors(path, width, wanted)

    matrix = np.random.default_rng(seed).normal(0.0, std, (vocab_size, width))
    matrix[PAD_ID] = 0.0
    missing = 0
    for i, words in candidates.items():
        hit = next((found[w] for w in words if w in found), None)
        if hit is None:
            missing += 1
        else:
            matrix[i] = hit
    logger.info(
        "word vectors from %s: %d of %d pieces missing (seeded random, std %.4f)",
        path,
        missing,
        len(candidates),
        std,
    )
    return matrix.astype(np.float32), missing


def build_word_embedding(text: ml_collections.ConfigDict, ctx: TextContext):
    """Learned embeddings, started from `text.word_vectors` (GloVe / word2vec) if set."""
    tokenizer = ctx.sentencepiece(text.vocab_size)
    kwargs = {}
    # The file only gives the initial values; a reopened run's params are in its checkpoint.
    if text.get("word_vectors") and ctx.training:
        matrix, _ = glove_init(
            os.path.expanduser(text.word_vectors),
            tokenizer,
            text.width,
            seed=rng.stream_seed(ctx.seed, "word_vectors"),
        )
        kwargs["embedding_init"] = matrix_init(matrix)
    encoder = WordEmbedding(
        vocab_size=tokenizer.vocab_size, width=text.width, dropout=text.dropout, **kwargs
    )
    return TextSetup("embedding", encoder, tokenizer, text.max_len)
