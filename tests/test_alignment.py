"""Alignment metrics against brute-force numpy, and the built-in evaluators on `small`."""

import json
import os

import jax
import numpy as np
import pytest

from t2i_jax.data import shapes, sources
from t2i_jax.data.examples import held_out_scenes, load_examples
from t2i_jax.errors import ConfigError, DataError
from t2i_jax.eval import evaluator_training as training
from t2i_jax.eval import evaluators as ev
from t2i_jax.metrics import alignment
from t2i_jax.text.tokenizer import prepare_tokenizer

# -- R-precision -----------------------------------------------------------------------------


def brute_force_r_precision(images, texts, ids, num_mismatched, folds, seed):
    """The AttnGAN / DM-GAN loop, written out: rank true + mismatched captions per image."""
    gen = np.random.default_rng(seed)
    hits = []
    for i in range(len(images)):
        candidates = np.array([j for j in range(len(texts)) if ids[j] != ids[i]])
        drawn = gen.choice(candidates, size=num_mismatched, replace=False)
        rows = [i, *drawn]
        cos = [
            float(images[i] @ texts[j] / (np.linalg.norm(images[i]) * np.linalg.norm(texts[j])))
            for j in rows
        ]
        best = int(np.argmax(cos))
        hits.append(best == 0 and sum(c == cos[0] for c in cos) == 1)
    size = len(hits) // folds
    rates = [np.mean(hits[f * size : (f + 1) * size]) for f in range(folds)]
    mean = sum(rates) / folds
    return hits, mean, (sum((r - mean) ** 2 for r in rates) / folds) ** 0.5


def test_r_precision_perfect_embeddings_is_one():
    gen = np.random.default_rng(0)
    emb = gen.normal(size=(200, 64))
    result = alignment.r_precision(3.0 * emb, emb, seed=1)  # scale must not matter: cosine
    assert result["mean"] == 1.0 and result["std"] == 0.0 and result["hits"].all()


def test_r_precision_random_embeddings_matches_brute_force_and_chance():
    gen = np.random.default_rng(1)
    images, texts = gen.normal(size=(1000, 16)), gen.normal(size=(1000, 16))
    ids = np.arange(1000)
    result = alignment.r_precision(images, texts, seed=7)
    hits, mean, std = brute_force_r_precision(images, texts, ids, 99, 10, seed=7)
    np.testing.assert_array_equal(result["hits"], hits)
    assert result["mean"] == pytest.approx(mean, abs=1e-12)
    assert result["std"] == pytest.approx(std, abs=1e-12)
    assert 0.0 < result["mean"] < 0.03  # chance is 1 / 100
    assert result["folds"] == 10 and result["num_mismatched"] == 99


def test_r_precision_partly_aligned_fold_statistics():
    gen = np.random.default_rng(2)
    texts = gen.normal(size=(300, 8))
    # The first half of the images see their caption, the second half noise: folds differ.
    images = np.concatenate([texts[:150], gen.normal(size=(150, 8))])
    ids = np.arange(300) // 2  # pairs of rows share caption text
    result = alignment.r_precision(images, texts, seed=3, text_ids=ids, num_mismatched=20, folds=6)
    hits, mean, std = brute_force_r_precision(images, texts, ids, 20, 6, seed=3)
    np.testing.assert_array_equal(result["hits"], hits)
    assert result["mean"] == pytest.approx(mean) and result["std"] == pytest.approx(std)
    assert result["std"] > 0.3  # folds 1-3 near 1, folds 4-6 near chance


def test_r_precision_never_draws_a_caption_with_the_same_text():
    # Rows 0 and 1 have the same caption text and the same embedding; drawn as a mismatch,
    # it would tie with the true caption (a miss). With text_ids it must never be drawn.
    texts = np.eye(4)[[0, 0, 1, 2]].astype(float)
    images = texts.copy()
    ids = np.array([5, 5, 6, 7])
    assert alignment.max_mismatched(ids) == 2
    for seed in range(5):
        result = alignment.r_precision(
            images, texts, seed=seed, text_ids=ids, num_mismatched=2, folds=2
        )
        assert result["mean"] == 1.0
    # Without the ids, the twin is a candidate and ties count as misses.
    misses = [
        alignment.r_precision(images, texts, seed=s, num_mismatched=2, folds=1)["mean"]
        for s in range(5)
    ]
    assert min(misses) < 1.0
    with pytest.raises(ValueError, match="mismatched"):
        alignment.r_precision(images, texts, seed=0, text_ids=ids, num_mismatched=3, folds=1)


def test_text_ids_of():
    ids = alignment.text_ids_of(["a", "b", "a", "c"])
    assert ids.tolist() == [0, 1, 0, 2]


# -- CLIP-style score ---------------------------------------------------------------------------


def test_clip_score_matches_brute_force_and_clamps_where_documented():
    gen = np.random.default_rng(4)
    images, texts = gen.normal(size=(50, 12)), gen.normal(size=(50, 12))
    cos = np.array(
        [
            a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            for a, b in zip(images, texts, strict=True)
        ]
    )
    assert (cos < 0).any() and (cos > 0).any()
    assert alignment.clip_score(images, texts) == pytest.approx(max(100 * cos.mean(), 0.0))
    assert alignment.clip_score(images, texts, clamp="pair") == pytest.approx(
        np.mean(np.maximum(100 * cos, 0.0))
    )
    # cos 0.5 and -0.9: torchmetrics clamps the mean (-20 -> 0), Hessel et al. each pair.
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.array([[0.5, np.sqrt(0.75)], [-0.9, np.sqrt(1 - 0.81)]])
    assert alignment.clip_score(a, b) == 0.0
    assert alignment.clip_score(a, b, clamp="pair") == pytest.approx(25.0)
    assert alignment.clip_score(a, a) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="clamp"):
        alignment.clip_score(a, b, clamp="none")


def test_clip_score_metric_merges_shards_like_one_pass():
    gen = np.random.default_rng(5)
    images, texts = gen.normal(size=(40, 6)), gen.normal(size=(40, 6))
    for clamp in ("mean", "pair"):
        m = alignment.clip_score_metric(clamp)
        one = m.compute(m.update(m.init(), images, texts))
        a = m.update(m.update(m.init(), images[:7], texts[:7]), images[7:20], texts[7:20])
        b = m.update(m.init(), images[20:], texts[20:])
        assert m.compute(m.merge(a, b)) == pytest.approx(one, abs=1e-12)


# -- attribute accuracy ------------------------------------------------------------------------


def _targets():
    # Example 0: one object; example 1: two objects; example 2: one object.
    return {
        "num_objects": np.array([1, 2, 1]),
        "shape": np.array([0, 1, 2]),
        "color": np.array([3, 4, 5]),
        "size": np.array([0, 1, 0]),
        "position": np.array([4, 3, 8]),
        "shape2": np.array([-1, 2, -1]),
        "color2": np.array([-1, 0, -1]),
        "size2": np.array([-1, 0, -1]),
        "position2": np.array([-1, 5, -1]),
        "relation": np.array([-1, 0, -1]),
    }


def test_named_attributes_follow_the_caption():
    named = alignment.named_attributes(_targets())
    assert named["position"].tolist() == [True, False, True]  # two objects: cell not named
    assert named["relation"].tolist() == [False, True, False]
    assert named["shape2"].tolist() == [False, True, False]
    assert not named["position2"].any()
    assert named["color"].all() and named["num_objects"].all()
    defined = alignment.defined_attributes(_targets())
    assert defined["position2"].tolist() == [False, True, False]


def test_attribute_accuracy_by_hand():
    targets = _targets()
    preds = {k: v.copy() for k, v in targets.items()}
    preds["color"][0] = 0  # example 0 wrong colour
    preds["position"][1] = 0  # example 1: position not named, must not count
    preds["relation"][1] = 1  # example 1 wrong relation
    preds["shape2"][0] = 2  # example 0 has no object 2: not counted
    metric = alignment.attribute_accuracy()
    state = metric.update(metric.init(), preds, targets, alignment.named_attributes(targets))
    result = metric.compute(state)
    assert result["color"] == pytest.approx(2 / 3)
    assert result["position"] == 1.0  # counted on examples 0 and 2 only
    assert result["relation"] == 0.0  # 0 of 1
    assert result["shape2"] == 1.0
    assert np.isnan(result["position2"])  # never named
    assert result["caption"] == pytest.approx(1 / 3)  # only example 2 has everything right
    assert result["count"] == 3


def test_attribute_accuracy_merge_equals_one_pass():
    gen = np.random.default_rng(6)
    n = 101
    targets = {k: gen.integers(0, 3, n) for k in alignment.PROBE_ATTRIBUTES}
    targets["num_objects"] = gen.integers(1, 3, n)
    preds = {k: np.where(gen.random(n) < 0.8, v, (v + 1) % 3) for k, v in targets.items()}
    mask = alignment.named_attributes(targets)
    metric = alignment.attribute_accuracy()
    one = metric.compute(metric.update(metric.init(), preds, targets, mask))

    def shard(lo, hi):
        part = lambda d: {k: v[lo:hi] for k, v in d.items()}  # noqa: E731
        return metric.update(metric.init(), part(preds), part(targets), part(mask))

    merged = metric.compute(metric.merge(metric.merge(shard(0, 30), shard(30, 31)), shard(31, n)))
    np.testing.assert_equal(merged, one)  # nan (position2, never named) equals nan
    assert 0.5 < one["shape"] < 0.95 and one["caption"] < one["shape"]


# -- the evaluators on the small variant ---------------------------------------------------------


@pytest.fixture(scope="module")
def small(evaluators_trained):
    """Evaluators of the session's small data (trained once, seed 0), and its data."""
    data_dir = evaluators_trained
    evaluators = ev.load_evaluators("t2i_shapes", data_dir, "small", train_if_missing=True)
    builder = sources.load_builder("t2i_shapes", data_dir, "small")
    return evaluators, builder


def test_evaluators_stored_and_reloaded(small, data_dir):
    evaluators, builder = small
    path = ev.evaluators_dir(builder)
    assert sorted(os.listdir(path)) == [
        "contrastive.safetensors",
        "evaluators.json",
        "probe.safetensors",
        "tokenizer.model",
    ]
    with open(os.path.join(path, "evaluators.json")) as f:
        info = json.load(f)
    assert info["seed"] == 0 and info["data"]["variant"] == "small"
    assert info["contrastive"]["tokenizer"] == "spm_vocab128.model"
    assert info["probe"]["config"]["channels"] == [32, 64, 128]
    # Reloaded params reproduce the stored real-test numbers exactly.
    again = ev.load_evaluators("t2i_shapes", data_dir, "small", train_if_missing=False)
    test = load_examples(builder, "test")
    accuracy = ev.probe_accuracy(again, test)
    assert accuracy == info["probe"]["test_accuracy"]
    assert ev.contrastive_scores(again, test, seed=0) == info["contrastive"]["test"]
    assert again.digests == info["digests"]


def test_held_out_scenes_are_new_scenes_of_held_out_pairs(small):
    _, builder = small
    extra = held_out_scenes(builder, 32, seed=0)
    a = extra.attributes
    two = a["num_objects"] == 2
    held = [shapes.is_held_out(s, c) for s, c in zip(a["shape"], a["color"], strict=True)]
    held2 = [two[i] and shapes.is_held_out(a["shape2"][i], a["color2"][i]) for i in range(32)]
    assert all(h or h2 for h, h2 in zip(held, held2, strict=True))
    # Another seed than the data set's, so not the compositional split's records (a single
    # scene can still coincide: one object has only 3 pairs x 2 sizes x 9 positions).
    split = load_examples(builder, "compositional", 32)
    same = (split.images == extra.images).all(axis=(1, 2, 3))
    assert same.mean() < 0.5 and extra.captions != split.captions
    assert extra.captions == held_out_scenes(builder, 32, seed=0).captions


def test_small_evaluators_beat_chance_by_far(small):
    evaluators, _ = small
    acc = evaluators.info["probe"]["test_accuracy"]
    # Measured on small (512 training images, 150 steps): num_objects/size/position 0.97-1.0,
    # colour 0.86, shape 0.69 (chance: 0.5, 0.5, 0.11, 0.17, 0.33).
    for key in ("num_objects", "size", "position", "size2", "relation"):
        assert acc[key] >= 0.9, (key, acc[key])
    assert acc["color"] >= 0.7 and acc["shape"] >= 0.5
    scores = evaluators.info["contrastive"]["test"]
    assert scores["r_precision"] >= 0.5  # measured 0.85; chance 1 / 63
    assert scores["clip_score"] > 50.0


def test_training_is_deterministic_from_the_seed(small):
    _, builder = small
    train = load_examples(builder, "train", 256)
    tokenizer = prepare_tokenizer(builder, ev.TOKENIZER_VOCAB)
    plan = training.PLANS["small"]

    def leaves(params):
        return [np.asarray(x) for x in jax.tree.leaves(params)]

    a, loss_a = training.train_probe(train, seed=3, plan=plan, steps=3)
    b, loss_b = training.train_probe(train, seed=3, plan=plan, steps=3)
    c, _ = training.train_probe(train, seed=4, plan=plan, steps=3)
    assert loss_a == loss_b
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c), strict=True))
    d, _ = training.train_contrastive(train, tokenizer, seed=3, plan=plan, steps=3)
    e, _ = training.train_contrastive(train, tokenizer, seed=3, plan=plan, steps=3)
    for x, y in zip(leaves(d), leaves(e), strict=True):
        np.testing.assert_array_equal(x, y)


def test_store_is_atomic(small, tmp_path, monkeypatch):
    evaluators, _ = small
    target = str(tmp_path / "evaluators")
    ev.store_evaluators(target, evaluators)
    before = {p.name: p.read_bytes() for p in (tmp_path / "evaluators").iterdir()}

    calls = []

    def failing_save(tensors, path):  # dies while writing the second file
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, path)

    real_save = ev.save_file
    monkeypatch.setattr(ev, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ev.store_evaluators(target, evaluators)
    # The old evaluators are untouched and no temporary folder is left behind.
    assert os.listdir(tmp_path) == ["evaluators"]
    after = {p.name: p.read_bytes() for p in (tmp_path / "evaluators").iterdir()}
    assert after == before


def test_missing_evaluators_without_training_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no evaluators"):
        ev.load_evaluators("t2i_shapes", str(tmp_path), "small", train_if_missing=False)
    # Any data set can have evaluators; one that does not exist is named as such.
    with pytest.raises(ConfigError, match="unknown data.name 'other'"):
        ev.load_evaluators("other", str(tmp_path), "small")
