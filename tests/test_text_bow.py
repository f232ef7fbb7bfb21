"""Tests for the bag-of-words / TF-IDF and word-embedding text encoders."""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from sklearn.feature_extraction.text import TfidfVectorizer

from t2i_jax.data import shapes
from t2i_jax.errors import DataError
from t2i_jax.text.bow import BagOfWords, TfidfStats, fit_tfidf, tfidf_vectors, token_counts
from t2i_jax.text.embedding import WordEmbedding, glove_init, matrix_init
from t2i_jax.text.tokenizer import EOS_ID, PAD_ID, UNK_ID, train_tokenizer

MAX_LEN = 16  # Some two-object captions are longer: truncation (EOS kept) is exercised.


@pytest.fixture(scope="module")
def corpus():
    """A tokenizer trained on t2i_shapes captions and the tokenized captions plus ''."""
    captions = [shapes.make_example(0, "train", i)["caption"] for i in range(300)] + [""]
    tokenizer = train_tokenizer(captions, 96)
    tokens, mask = tokenizer.encode(captions, MAX_LEN)
    return tokenizer, tokens, mask


def _documents(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Each row's counted ids (valid, not PAD), the documents given to scikit-learn."""
    return [row[m & (row != PAD_ID)].tolist() for row, m in zip(tokens, mask, strict=True)]


def _random_batch(seed: int, vocab: int, batch: int = 40, length: int = 12):
    """Random ids (PAD included at valid positions) with random right-padded masks."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    lengths = rng.integers(0, length + 1, (batch, 1))
    return tokens, np.arange(length)[None] < lengths


def _sklearn_tfidf(docs, smooth_idf: bool, sublinear_tf: bool):
    vectorizer = TfidfVectorizer(
        analyzer=lambda ids: ids, smooth_idf=smooth_idf, sublinear_tf=sublinear_tf, norm="l2"
    )
    rows = vectorizer.fit_transform(docs).toarray()  # float64
    ids = np.array(sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get))
    return vectorizer.idf_, rows, ids


def _check_against_sklearn(tokens, mask, vocab, smooth_idf, sublinear_tf):
    stats = fit_tfidf(tokens, mask, vocab, smooth_idf=smooth_idf, sublinear_tf=sublinear_tf)
    ref_idf, ref_rows, ids = _sklearn_tfidf(_documents(tokens, mask), smooth_idf, sublinear_tf)
    np.testing.assert_allclose(stats.idf[ids], ref_idf, rtol=1e-6)
    rows = np.asarray(tfidf_vectors(token_counts(tokens, mask, vocab), stats.idf, sublinear_tf))
    np.testing.assert_allclose(rows[:, ids], ref_rows, rtol=1e-5, atol=1e-7)
    unseen = np.setdiff1d(np.arange(vocab), ids)
    assert not rows[:, unseen].any()  # Ids scikit-learn never saw are absent from every row.
    return stats, unseen


@pytest.mark.parametrize("smooth_idf", [True, False])
@pytest.mark.parametrize("sublinear_tf", [False, True])
def test_tfidf_matches_sklearn_on_captions(corpus, smooth_idf, sublinear_tf):
    tokenizer, tokens, mask = corpus
    stats, _ = _check_against_sklearn(tokens, mask, tokenizer.vocab_size, smooth_idf, sublinear_tf)
    assert stats.idf[EOS_ID] == 1.0  # In every caption: the minimum idf, either formula.
    assert stats.idf.min() == 1.0 and stats.document_frequency[EOS_ID] == len(tokens)
    assert stats.document_frequency[PAD_ID] == 0 and int(stats.num_documents) == len(tokens)


@pytest.mark.parametrize("smooth_idf", [True, False])
def test_tfidf_matches_sklearn_on_random_ids(smooth_idf):
    vocab = 30
    tokens, mask = _random_batch(1, vocab, batch=60)
    tokens[:, :2] = np.array([4, 7])  # Repeated ids in many rows: df > 1, tf > 1.
    stats, unseen = _check_against_sklearn(tokens, mask, vocab, smooth_idf, True)
    n = len(tokens)
    assert PAD_ID in unseen  # PAD at valid positions does not count.
    expected = np.log(1 + n) + 1 if smooth_idf else np.log(n) + 1
    np.testing.assert_allclose(stats.idf[unseen], expected, rtol=1e-6)


def test_counts_equal_bincount():
    vocab = 25
    tokens, mask = _random_batch(2, vocab)
    counts = np.asarray(token_counts(tokens, mask, vocab))
    for row, m, c in zip(tokens, mask, counts, strict=True):
        expected = np.bincount(row[m], minlength=vocab)
        expected[PAD_ID] = 0
        np.testing.assert_array_equal(c, expected)


def _scramble_padding(tokens, mask, vocab: int, seed: int = 9) -> np.ndarray:
    other = np.random.default_rng(seed).integers(0, vocab, tokens.shape).astype(np.int32)
    return np.where(mask, tokens, other)


@functools.cache
def _apply(model):
    return jax.jit(lambda p, t, m: model.apply(p, t, m, train=False))


def test_bag_of_words_masks_padding_and_projects_tfidf(corpus):
    tokenizer, tokens, mask = corpus
    vocab = tokenizer.vocab_size
    stats = fit_tfidf(tokens, mask, vocab)
    batch_t, batch_m = tokens[:8], mask[:8]
    assert (~batch_m).any()
    scrambled = _scramble_padding(batch_t, batch_m, vocab)
    for idf in (None, stats.idf_tuple()):
        for layer_norm in (True, False):
            model = BagOfWords(vocab, 32, idf=idf, layer_norm=layer_norm)
            params = nn.unbox(model.init(jax.random.key(0), batch_t, batch_m))
            out = _apply(model)(params, batch_t, batch_m)
            assert out.seq is None and out.pooled.shape == (8, 32)
            np.testing.assert_array_equal(out.mask, batch_m)
            np.testing.assert_array_equal(
                out.pooled, _apply(model)(params, scrambled, batch_m).pooled
            )
            if not layer_norm:  # pooled is exactly the projection of the counts / TF-IDF rows.
                counts = token_counts(batch_t, batch_m, vocab)
                x = counts if idf is None else tfidf_vectors(counts, stats.idf)
                proj = params["params"]["proj"]
                np.testing.assert_allclose(
                    out.pooled, x @ proj["kernel"] + proj["bias"], rtol=1e-5, atol=1e-6
                )
    assert "idf" not in str(jax.tree_util.tree_structure(params))  # A constant, not a param.


def test_word_embedding_masks_padding_and_means(corpus):
    tokenizer, tokens, mask = corpus
    vocab = tokenizer.vocab_size
    batch_t, batch_m = tokens[:8], mask[:8]
    table = np.random.default_rng(3).normal(size=(vocab, 16)).astype(np.float32)
    model = WordEmbedding(vocab, 16, embedding_init=matrix_init(table))
    params = nn.unbox(model.init(jax.random.key(0), batch_t, batch_m))
    np.testing.assert_array_equal(params["params"]["embed"]["embedding"], table)
    out = _apply(model)(params, batch_t, batch_m)
    scrambled = _apply(model)(params, _scramble_padding(batch_t, batch_m, vocab), batch_m)
    np.testing.assert_array_equal(out.seq, scrambled.seq)  # Valid: same; padded: zero.
    np.testing.assert_array_equal(out.pooled, scrambled.pooled)
    assert not np.asarray(out.seq)[~batch_m].any()
    np.testing.assert_array_equal(np.asarray(out.seq)[batch_m], table[batch_t[batch_m]])
    for row in range(8):
        expected = table[batch_t[row][batch_m[row]]].mean(0)
        np.testing.assert_allclose(out.pooled[row], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        WordEmbedding(vocab, 8, embedding_init=matrix_init(table)).init(
            jax.random.key(0), batch_t, batch_m
        )


def test_tfidf_stats_save_load(corpus, tmp_path):
    tokenizer, tokens, mask = corpus
    stats = fit_tfidf(tokens, mask, tokenizer.vocab_size, smooth_idf=False, sublinear_tf=True)
    path = str(tmp_path / "tfidf.npz")
    stats.save(path)
    loaded = TfidfStats.load(path)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (loaded.smooth_idf, loaded.sublinear_tf) == (False, True)
    assert loaded.idf.dtype == np.float32 and loaded.vocab_size == tokenizer.vocab_size
    with pytest.raises(DataError, match="not found"):
        TfidfStats.load(str(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a TF-IDF"):
        TfidfStats.load(str(tmp_path / "junk.npz"))


def _pieces(tokenizer) -> list[str]:
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _word(piece: str) -> str:
    return piece.removeprefix("\u2581").lower()


def _write_vectors(path, words, vectors, header: str | None = None) -> None:
    lines = [header] if header else []
    lines += [
        w + " " + " ".join(f"{v:.6f}" for v in vec) for w, vec in zip(words, vectors, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_glove_init(corpus, tmp_path, caplog):
    tokenizer = corpus[0]
    width = 8
    pieces = _pieces(tokenizer)
    ordinary = range(EOS_ID + 1, len(pieces))
    words = [_word(pieces[i]) for i in ordinary]
    # Leave out three words that exactly one piece each maps to; every other word is there.
    left_out = [w for w in dict.fromkeys(words) if w and words.count(w) == 1][:3]
    empty = words.count("")  # The lone "▁" piece, if any, has no word: missing too.
    file_words = sorted({w for w in words if w and w not in left_out} | {"unrelated"})
    rng = np.random.default_rng(5)
    vectors = rng.normal(0.0, 0.5, (len(file_words), width))
    path = tmp_path / "glove.txt"
    _write_vectors(path, file_words, vectors)
    by_word = dict(zip(file_words, vectors, strict=True))

    with caplog.at_level(logging.INFO, logger="t2i_jax.text.embedding"):
        matrix, missing = glove_init(str(path), tokenizer, width, seed=0)
    assert missing == 3 + empty
    assert f"{missing} of {len(ordinary)} pieces missing" in caplog.text
    assert matrix.shape == (tokenizer.vocab_size, width) and matrix.dtype == np.float32
    for i in ordinary:
        word = _word(pieces[i])
        if word in by_word:
            np.testing.assert_allclose(matrix[i], by_word[word], atol=1e-6)
    assert not matrix[PAD_ID].any() and matrix[UNK_ID].any() and matrix[EOS_ID].any()

    again, _ = glove_init(str(path), tokenizer, width, seed=0)
    np.testing.assert_array_equal(matrix, again)
    other, _ = glove_init(str(path), tokenizer, width, seed=1)
    random_rows = [UNK_ID, EOS_ID] + [i for i in ordinary if _word(pieces[i]) not in by_word]
    known_rows = [i for i in ordinary if _word(pieces[i]) in by_word]
    assert (matrix[random_rows] != other[random_rows]).all()
    np.testing.assert_array_equal(matrix[known_rows], other[known_rows])

    # A word2vec file with two words: nearly every piece is random, with the file's std.
    w2v = tmp_path / "w2v.txt"
    big = rng.normal(0.0, 0.5, (2, 256))
    _write_vectors(w2v, ["a", "circle"], big, header="2 256")
    matrix, missing = glove_init(str(w2v), tokenizer, 256, seed=0)
    assert missing == len(ordinary) - sum(_word(pieces[i]) in ("a", "circle") for i in ordinary)
    random_part = matrix[[i for i in ordinary if _word(pieces[i]) not in ("a", "circle")]]
    assert abs(random_part.std() / big.std() - 1) < 0.1


def test_glove_init_errors(corpus, tmp_path):
    tokenizer = corpus[0]
    with pytest.raises(DataError, match="not found"):
        glove_init(str(tmp_path / "absent.txt"), tokenizer, 4, seed=0)
    path = tmp_path / "v.txt"
    path.write_text("red 0.1 0.2 0.3\nblue 0.4 0.5 0.6\n")
    with pytest.raises(DataError, match="dimension 3, not 4"):
        glove_init(str(path), tokenizer, 4, seed=0)
    path.write_text("2 3\nred 0.1 0.2 0.3\n")
    with pytest.raises(DataError, match="dimension 3, not 4"):
        glove_init(str(path), tokenizer, 4, seed=0)
    path.write_text("red 0.1 0.2 0.3\nblue 0.4 0.5\ngreen 0.1 0.1 0.1\n")
    with pytest.raises(DataError, match="line 2"):
        glove_init(str(path), tokenizer, 3, seed=0)
    path.write_text("red 0.1 0.2 0.3\nblue 0.4 0.5 0.6\ngreen 0.1 x 0.1\n")
    with pytest.raises(DataError, match="line 3"):
        glove_init(str(path), tokenizer, 3, seed=0)
    path.write_text("")
    with pytest.raises(DataError, match="no word vectors"):
        glove_init(str(path), tokenizer, 3, seed=0)


def test_bow_rejects_idf_of_wrong_size():
    tokens, mask = _random_batch(0, 10, batch=2)
    with pytest.raises(ValueError, match="idf has 3"):
        BagOfWords(10, 4, idf=(1.0, 1.0, 1.0)).init(jax.random.key(0), tokens, mask)
    # Out-of-range ids are dropped, not wrapped or clipped onto a real id.
    counts = token_counts(jnp.array([[-1, 10, 3]]), jnp.ones((1, 3), bool), 10)
    np.testing.assert_array_equal(counts, np.eye(10)[[3]])
