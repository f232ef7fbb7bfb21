"""Bag-of-words and TF-IDF text encoders over the tokenizer's vocabulary.

Which tokens count: every token at a valid mask position except PAD. EOS counts. Every
caption ends with exactly one EOS, so its document frequency is the number of documents and
its idf is the minimum, exactly 1.0 with or without smoothing; it weighs little next to the
words. Counting it keeps "the tokens the mask marks valid" the one rule every encoder
follows, and it gives the empty caption (classifier-free guidance's null caption, whose only
token is EOS) a non-zero vector, the EOS unit vector, instead of a zero row.

TF-IDF follows scikit-learn's `TfidfVectorizer` (defaults `smooth_idf=True`,
`sublinear_tf=False`, `norm="l2"`), with each caption's valid token ids as its document:

  tf(t, d)  = count of t in d, or 1 + ln(count) when sublinear_tf (0 stays 0)
  idf(t)    = ln((1 + n) / (1 + df(t))) + 1     with smooth_idf
            = ln(n / df(t)) + 1                 without
  tfidf(d)  = tf(., d) * idf, then divided by its L2 norm (a zero row stays zero)

where n is the number of training captions and df(t) the number of them containing t.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from t2i_jax import partitioning as part
from t2i_jax.errors import DataError
from t2i_jax.text.features import TextFeatures
from t2i_jax.text.setup import TextContext, TextSetup
from t2i_jax.text.tokenizer import PAD_ID


def _counted(tokens: np.ndarray | jax.Array, mask: np.ndarray | jax.Array):
    """Positions that count: valid under the mask and not PAD."""
    return mask.astype(bool) & (tokens != PAD_ID)


@struct.dataclass
class TfidfStats:
    """IDF statistics of a tokenized training corpus (a pytree; settings are static).

    Attributes:
      idf: float32 [vocab] inverse document frequency of each token id.
      document_frequency: int64 [vocab] number of training captions containing each id.
      num_documents: int64 [] number of training captions n.
      smooth_idf: whether idf used the smoothed formula.
      sublinear_tf: whether term frequencies are 1 + ln(count); the encoder must use the same.
    """

    idf: np.ndarray
    document_frequency: np.ndarray
    num_documents: np.ndarray
    smooth_idf: bool = struct.field(pytree_node=False, default=True)
    sublinear_tf: bool = struct.field(pytree_node=False, default=False)

    @property
    def vocab_size(self) -> int:
        return int(self.idf.shape[0])

    def idf_tuple(self) -> tuple[float, ...]:
        """The idf as a hashable tuple, the form `BagOfWords.idf` takes."""
        return tuple(float(v) for v in np.asarray(self.idf, np.float32))

    def save(self, path: str) -> None:
        """Writes an .npz atomically (a killed run never leaves half a file)."""
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:  # A file object: np.savez adds no ".npz" suffix.
            np.savez(
                f,
                idf=np.asarray(self.idf, np.float32),
                document_frequency=np.asarray(self.document_frequency, np.int64),
                num_documents=np.asarray(self.num_documents, np.int64),
                smooth_idf=np.asarray(self.smooth_idf),
                sublinear_tf=np.asarray(self.sublinear_tf),
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> TfidfStats:
        if not os.path.isfile(path):
            raise DataError(f"TF-IDF statistics not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as f:
                stats = cls(
                    idf=f["idf"].astype(np.float32),
                    document_frequency=f["document_frequency"].astype(np.int64),
                    num_documents=f["num_documents"].astype(np.int64).reshape(()),
                    smooth_idf=bool(f["smooth_idf"]),
                    sublinear_tf=bool(f["sublinear_tf"]),
                )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a TF-IDF statistics file ({e})") from e
        if stats.idf.ndim != 1 or stats.document_frequency.shape != stats.idf.shape:
            raise DataError(
                f"{path}: idf {stats.idf.shape} and document_frequency "
                f"{stats.document_frequency.shape} must be equal 1-D shapes"
            )
        return stats


def fit_tfidf(
    tokens: np.ndarray,
    mask: np.ndarray,
    vocab_size: int,
    *,
    smooth_idf: bool = True,
    sublinear_tf: bool = False,
) -> TfidfStats:
    """IDF of each token id over a tokenized corpus, one caption per row.

    idf = ln((1 + n) / (1 + df)) + 1 with `smooth_idf` (scikit-learn's default), else
    ln(n / df) + 1; n counts every row, df the rows in which the id occurs at a counted
    position (valid under `mask`, not PAD; EOS counts, see the module docstring). Without
    smoothing an id that never occurs (df = 0) would get an infinite idf; it gets ln(n) + 1
    instead, the idf of an id seen once, so an unseen id is weighted as the rarest seen one.

    Args:
      tokens: int [N, L] token ids.
      mask: bool [N, L], True at valid positions.
      vocab_size: number of token ids; every counted id must be below it.
      smooth_idf: add one to n and to every df, as if one extra document held every id.
      sublinear_tf: stored for the encoder (tf = 1 + ln(count)); idf does not depend on it.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must be equal [N, L]")
    n = tokens.shape[0]
    if n == 0:
        raise ValueError("cannot fit TF-IDF on an empty corpus")
    rows, cols = np.nonzero(_counted(tokens, mask))
    ids = tokens[rows, cols].astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    # Unique (row, id) pairs, without an [N, vocab] matrix: corpora can be large.
    present = np.unique(rows.astype(np.int64) * vocab_size + ids)
    df = np.bincount(present % vocab_size, minlength=vocab_size).astype(np.int64)
    if smooth_idf:
        idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    else:
        idf = np.log(n / np.maximum(df, 1)) + 1.0
    return TfidfStats(
        idf=idf.astype(np.float32),
        document_frequency=df,
        num_documents=np.asarray(n, np.int64),
        smooth_idf=smooth_idf,
        sublinear_tf=sublinear_tf,
    )


def token_counts(tokens: jax.Array, mask: jax.Array, vocab_size: int) -> jax.Array:
    """float32 [B, vocab] count of each id over the counted positions of each row.

    Equal to summing one-hot vectors at the counted positions, done as a scatter-add so no
    [B, L, vocab] array is built. Padded positions and PAD never count; ids outside
    [0, vocab_size) are dropped.
    """
    tokens = jnp.asarray(tokens)
    counted = _counted(tokens, jnp.asarray(mask)) & (tokens >= 0) & (tokens < vocab_size)
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    # Not-counted positions add 0 at a clipped (in-range) index.
    ids = jnp.clip(tokens, 0, vocab_size - 1)
    zeros = jnp.zeros((tokens.shape[0], vocab_size), jnp.float32)
    return zeros.at[rows, ids].add(counted.astype(jnp.float32))


def term_frequency(counts: jax.Array, sublinear_tf: bool) -> jax.Array:
    """Raw counts, or 1 + ln(count) where count > 0 (scikit-learn's sublinear_tf)."""
    if not sublinear_tf:
        return counts
    return jnp.where(counts > 0, 1.0 + jnp.log(jnp.maximum(counts, 1.0)), 0.0)


def tfidf_vectors(counts: jax.Array, idf: jax.Array, sublinear_tf: bool = False) -> jax.Array:
    """L2-normalised tf * idf rows, float32 [B, vocab]; an all-zero row stays zero."""
    x = term_frequency(counts, sublinear_tf) * jnp.asarray(idf, jnp.float32)[None]
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.where(norm > 0, norm, 1.0)


class BagOfWords(nn.Module):
    """Counts (or TF-IDF) over the vocabulary, then a learned Dense projection to `width`.

    With `idf` None the features are the term frequencies (raw counts, as scikit-learn's
    `CountVectorizer`); with `idf` they are the L2-normalised TF-IDF rows of
    `tfidf_vectors`. The idf is a constant attribute, not a parameter: it is fitted once on
    the training captions (`fit_tfidf`) and never trained. A tuple keeps the module hashable
    (`TfidfStats.idf_tuple()`).

    A final LayerNorm (on by default) puts the pooled features on the same per-feature scale
    as the transformer encoder's (which ends with one), so swapping encoders changes what
    the features say, not their scale; raw counts otherwise grow with caption length.

    Fields:
      vocab_size: number of token ids.
      width: output size D.
      idf: float [vocab_size] idf, or None for plain bag-of-words counts.
      sublinear_tf: tf = 1 + ln(count); set it as the statistics were fitted.
      layer_norm: LayerNorm after the projection.
      dtype: compute dtype of the projection (params stay float32); outputs are float32.
      remat: none | blocks | full (t2i_jax/remat.py; no blocks: only full applies).
    """

    vocab_size: int
    width: int = 128
    idf: tuple[float, ...] | None = None
    sublinear_tf: bool = False
    layer_norm: bool = True
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False) -> TextFeatures:
        """tokens int32 [B, L], mask bool [B, L] -> TextFeatures(None, pooled [B, D], mask)."""
        del train  # No dropout: the features are deterministic.
        mask = jnp.asarray(mask).astype(bool)
        counts = token_counts(tokens, mask, self.vocab_size)
        if self.idf is None:
            x = term_frequency(counts, self.sublinear_tf)
        else:
            if len(self.idf) != self.vocab_size:
                raise ValueError(f"idf has {len(self.idf)} entries, vocab_size={self.vocab_size}")
            x = tfidf_vectors(counts, jnp.asarray(self.idf, jnp.float32), self.sublinear_tf)
        h = part.Dense(self.width, dtype=self.dtype, name="proj")(x.astype(self.dtype))
        if self.layer_norm:
            h = nn.LayerNorm(dtype=self.dtype, name="norm")(h)
        return TextFeatures(seq=None, pooled=h.astype(jnp.float32), mask=mask)


# -- the registry's factories (text/encoders.py): (text config, TextContext) -> TextSetup --


def build_bow(text: ml_collections.ConfigDict, ctx: TextContext):
    tokenizer = ctx.sentencepiece(text.vocab_size)
    encoder = BagOfWords(vocab_size=tokenizer.vocab_size, width=text.width)
    return TextSetup("bow", encoder, tokenizer, text.max_len)


def build_tfidf(text: ml_collections.ConfigDict, ctx: TextContext):
    """Bag-of-words weighted by the idf of the training captions (`tfidf.npz` in the run)."""
    tokenizer = ctx.sentencepiece(text.vocab_size)
    path = ctx.path("tfidf.npz")
    if os.path.isfile(path) or not ctx.training:
        stats = TfidfStats.load(path)
    else:
        tokens, mask = tokenizer.encode(ctx.training_captions(), text.max_len)
        stats = fit_tfidf(
            tokens, mask, tokenizer.vocab_size, sublinear_tf=text.get("sublinear_tf", False)
        )
        if ctx.primary():
            stats.save(path)
    if stats.vocab_size != tokenizer.vocab_size:
        raise DataError(
            f"{path} has {stats.vocab_size} idf entries, the tokenizer {tokenizer.vocab_size}"
        )
    encoder = BagOfWords(
        vocab_size=tokenizer.vocab_size,
        width=text.width,
        idf=stats.idf_tuple(),
        sublinear_tf=stats.sublinear_tf,
    )
    return TextSetup("tfidf", encoder, tokenizer, text.max_len)
