import numpy as np

from t2i_jax.text.tokenizer import EOS_ID, PAD_ID, Tokenizer, train_tokenizer

CAPTIONS = [
    "a large red circle in the top left",
    "there is a small blue square at the bottom",
    "a green triangle to the left of a yellow circle",
    "a purple square above a cyan triangle",
] * 20


def test_round_trip_and_eos():
    tokenizer = train_tokenizer(CAPTIONS, 64)
    tokens, mask = tokenizer.encode(CAPTIONS[:4], 32)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    assert tokenizer.decode(tokens) == CAPTIONS[:4]
    lengths = mask.sum(1)
    assert (tokens[np.arange(4), lengths - 1] == EOS_ID).all()
    assert (tokens[~mask] == PAD_ID).all()


def test_truncation_keeps_eos_and_empty_caption_has_one_token():
    tokenizer = train_tokenizer(CAPTIONS, 64)
    tokens, mask = tokenizer.encode(["a large red circle in the top left", ""], 4)
    assert mask[0].all() and tokens[0, -1] == EOS_ID
    assert mask[1].tolist() == [True, False, False, False] and tokens[1, 0] == EOS_ID


def test_training_is_deterministic_and_saves(tmp_path):
    a, b = train_tokenizer(CAPTIONS, 64), train_tokenizer(CAPTIONS, 64)
    assert a.model_proto == b.model_proto
    a.save(str(tmp_path / "t.model"))
    loaded = Tokenizer.load(str(tmp_path / "t.model"))
    np.testing.assert_array_equal(loaded.encode(CAPTIONS, 16)[0], a.encode(CAPTIONS, 16)[0])
