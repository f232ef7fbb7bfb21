"""The frozen-encoder feature cache: equal to the encoder, reused, rebuilt on a new key, and
never left half-written by a killed process."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from t2i_jax.errors import DataError
from t2i_jax.text import cache

CAPTIONS = ["a red circle", "a blue square", "a red circle", "a green triangle", "a blue square"]
WIDTH, LENGTH = 3, 4


def tokenize(captions):
    """Deterministic fake tokens: word lengths, padded with 0."""
    tokens = np.zeros((len(captions), LENGTH), np.int32)
    for i, caption in enumerate(captions):
        ids = [len(w) for w in caption.split()][:LENGTH]
        tokens[i, : len(ids)] = ids
    return tokens, tokens > 0


class CountingEncoder:
    """pooled = (sum of ids) * scale; seq = ids * scale; counts calls and rows."""

    def __init__(self, scale: float = 1.0, with_seq: bool = True):
        self.scale, self.with_seq, self.calls, self.shapes = scale, with_seq, 0, set()

    def __call__(self, tokens, mask):
        self.calls += 1
        self.shapes.add(tokens.shape)
        seq = (tokens[..., None] * mask[..., None] * np.arange(1, WIDTH + 1)) * self.scale
        out = {"pooled": seq.sum(1).astype(np.float32)}
        out["seq"] = seq.astype(np.float32) if self.with_seq else None
        return out


def build(root, key, encoder, captions=CAPTIONS, batch_size=2):
    return cache.open_or_build(
        str(root),
        "train",
        key,
        captions=lambda: captions,
        tokenize=tokenize,
        encode=encoder,
        batch_size=batch_size,
    )


@pytest.mark.parametrize("with_seq", [True, False])
def test_features_equal_the_encoder_per_example(tmp_path, with_seq):
    encoder = CountingEncoder(with_seq=with_seq)
    features = build(tmp_path, "k", encoder)
    assert features.num_examples == len(CAPTIONS) and features.meta["num_unique"] == 3
    assert features.has_seq == with_seq
    assert encoder.shapes == {(2, LENGTH)}  # Fixed batch shape, the last batch padded.
    expected = CountingEncoder(with_seq=with_seq)(*tokenize(CAPTIONS))
    for i in range(len(CAPTIONS)):
        row = features.features(i)
        np.testing.assert_array_equal(row["text_pooled"], expected["pooled"][i])
        if with_seq:
            np.testing.assert_array_equal(row["text_seq"], expected["seq"][i])
        else:
            assert "text_seq" not in row
    # Picklable for grain workers: the copy reopens the memory maps itself.
    copy = pickle.loads(pickle.dumps(features))
    np.testing.assert_array_equal(copy.features(3)["text_pooled"], expected["pooled"][3])


def test_reused_and_rebuilt_when_the_key_changes(tmp_path):
    first = CountingEncoder()
    build(tmp_path, cache.cache_key("encoder", "weights-a"), first)
    assert first.calls == 2  # 3 distinct captions in batches of 2.

    again = CountingEncoder()
    reused = build(tmp_path, cache.cache_key("encoder", "weights-a"), again)
    assert again.calls == 0
    np.testing.assert_array_equal(reused.features(0)["text_pooled"], [10.0, 20.0, 30.0])

    changed = CountingEncoder(scale=2.0)  # "New weights": a new key, a new cache.
    rebuilt = build(tmp_path, cache.cache_key("encoder", "weights-b"), changed)
    assert changed.calls == 2
    np.testing.assert_array_equal(rebuilt.features(0)["text_pooled"], [20.0, 40.0, 60.0])
    assert len([d for d in os.listdir(tmp_path) if d.startswith("train-")]) == 2
    assert cache.cache_key("a", "b") != cache.cache_key("ab")  # Parts are separated.


def test_a_failed_build_leaves_no_cache(tmp_path):
    class Failing(CountingEncoder):
        def __call__(self, tokens, mask):
            if self.calls == 1:
                raise RuntimeError("out of memory")
            return super().__call__(tokens, mask)

    with pytest.raises(RuntimeError):
        build(tmp_path, "k", Failing())
    assert not os.path.exists(tmp_path / "train-k")
    features = build(tmp_path, "k", CountingEncoder())
    assert features.features(4)["text_pooled"].tolist() == [11.0, 22.0, 33.0]
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == ["train-k"]


def test_concurrent_builds_make_one_cache(tmp_path):
    """Two runs sharing a data directory: the second waits for the first's cache."""

    class Slow(CountingEncoder):
        def __call__(self, tokens, mask):
            time.sleep(0.2)
            return super().__call__(tokens, mask)

    encoders = [Slow(), Slow()]
    results = [None, None]

    def build_in_thread(i):
        results[i] = build(tmp_path, "k", encoders[i])

    threads = [threading.Thread(target=build_in_thread, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(e.calls for e in encoders) == [0, 2]  # One built, the other reused.
    expected = CountingEncoder()(*tokenize(CAPTIONS))["pooled"]
    for features in results:
        got = np.stack([features.features(i)["text_pooled"] for i in range(len(CAPTIONS))])
        np.testing.assert_array_equal(got, expected)


KILLED_BUILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from text.test_cache import CountingEncoder, build

    class Slow(CountingEncoder):
        def __call__(self, tokens, mask):
            out = super().__call__(tokens, mask)
            if self.calls == 2:
                open({marker!r}, "w").close()  # Half the features are written.
                time.sleep(600)
            return out

    build({root!r}, "k", Slow(), captions=[f"caption number {{i}}" for i in range(8)])
    """
)


def test_survives_a_kill_mid_write(tmp_path):
    root, marker = tmp_path / "cache", tmp_path / "marker"
    root.mkdir()
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = KILLED_BUILD.format(tests=tests, marker=str(marker), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "the build ended before it was killed"
            assert time.time() < deadline, "the build never reached its second batch"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [n for n in os.listdir(root) if not n.endswith(".lock")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".train-k.tmp-")
    with pytest.raises(DataError, match="unreadable"):
        cache.FeatureCache(str(root / leftovers[0]))  # Half a cache has no meta.json.

    captions = [f"caption number {i}" for i in range(8)]
    features = build(root, "k", CountingEncoder(), captions=captions)
    expected = CountingEncoder()(*tokenize(captions))["pooled"]
    got = np.stack([features.features(i)["text_pooled"] for i in range(8)])
    np.testing.assert_array_equal(got, expected)
    assert [n for n in os.listdir(root) if not n.endswith(".lock")] == ["train-k"]
