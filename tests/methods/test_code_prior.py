"""The autoregressive code prior: causality, the key/value cache, and its sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.methods.code_sampling import (
    SamplingOptions,
    filter_logits,
    sample_codes,
    sample_codes_uncached,
)
from t2i_jax.nets.code_prior import CodePrior, init_cache

K, N, B, L, D = 12, 10, 3, 5, 8


@pytest.fixture(scope="module")
def prior():
    model = CodePrior(num_codes=K, seq_len=N, width=16, depth=2, num_heads=2)
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    null = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    null_mask = jnp.asarray([[1, 0, 0, 0, 0]] * B, bool)
    tokens = jnp.asarray(rng.integers(0, K, size=(B, N)), jnp.int32)
    params = model.init(jax.random.key(0), tokens, text, mask)["params"]
    # Scale the logits up so the test distributions are far from uniform.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 8 if "logits" in jax.tree_util.keystr(p) else x, params
    )
    return model, params, text, mask, null, null_mask, tokens


def test_logits_are_causal(prior):
    model, params, text, mask, *_, tokens = prior
    a = model.apply({"params": params}, tokens, text, mask)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % K)
    b = model.apply({"params": params}, changed, text, mask)
    np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
    assert not np.allclose(np.asarray(a[:, 6:]), np.asarray(b[:, 6:]))


def test_cached_decoding_equals_the_full_pass(prior):
    model, params, text, mask, *_, tokens = prior
    full = model.apply({"params": params}, tokens, text, mask)
    cache = init_cache(model, B, text, mask)
    steps = []
    for i in range(N):
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            tokens[:, i : i + 1],
            text,
            mask,
            positions=jnp.asarray([i]),
            decode=True,
            mutable=["cache"],
        )
        cache = mutated["cache"]
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.asarray(jnp.stack(steps, 1)), np.asarray(full), atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(),
        SamplingOptions(temperature=0.7, top_k=4),
        SamplingOptions(temperature=1.3, top_p=0.8, guidance=3.0),
        SamplingOptions(temperature=0.0, guidance=2.0),
    ],
)
def test_cached_sampling_equals_uncached_sampling(prior, options):
    """The cached and uncached loops compute the same logits by different programs. In
    float32 their round-off (~1e-7) can move a draw that sits on a top-p boundary or a
    categorical threshold, so the networks run in float64 here (agreement ~1e-15): then
    every draw must be the same."""
    model, params, text, mask, null, null_mask, _ = prior
    with jax.enable_x64(True):
        model = model.clone(dtype=jnp.float64)
        params, text, null = jax.tree.map(
            lambda x: jnp.asarray(x, jnp.float64), (params, text, null)
        )
        args = (model, params, text, mask, null, null_mask, jax.random.key(3), options)
        cached = jax.jit(sample_codes, static_argnums=(0, 7))(*args)
        uncached = jax.jit(sample_codes_uncached, static_argnums=(0, 7))(*args)
        assert cached.shape == (B, N) and cached.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
        again = jax.jit(sample_codes, static_argnums=(0, 7))(*args)
        np.testing.assert_array_equal(np.asarray(cached), np.asarray(again))
        if options.temperature > 0:
            other = sample_codes(*args[:6], jax.random.key(4), options)
            assert not np.array_equal(np.asarray(cached), np.asarray(other))


def test_top_k_and_top_p_keep_the_right_codes():
    logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.1, 0.05]]))
    top2 = filter_logits(logits, top_k=2, top_p=1.0)
    assert np.isfinite(np.asarray(top2)).tolist() == [[True, False, True, False, False]]
    # Nucleus 0.85: 0.5 + 0.3 = 0.8 < 0.85, so 0.1 joins; the two 0.05s stay out.
    nucleus = filter_logits(logits, top_k=0, top_p=0.85)
    assert np.isfinite(np.asarray(nucleus)).tolist() == [[True, False, True, True, False]]
    # A tiny nucleus still keeps the most likely code.
    assert np.isfinite(np.asarray(filter_logits(logits, top_k=0, top_p=1e-6))).sum() == 1


def test_top_k_samples_only_from_the_top_k():
    logits = jnp.log(jnp.asarray([0.4, 0.3, 0.2, 0.1]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(
        lambda k: jax.random.categorical(k, filter_logits(logits, top_k=2, top_p=1.0))
    )(keys)
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 2000 - 4 / 7) < 0.04  # renormalised 0.4 / 0.7


def teacher_forced_logits(model, params, codes, ctx, ctx_mask):
    """Full-pass logits [B, N, K] of the prior fed [BOS, c_0, ..., c_{N-2}]."""
    bos = jnp.full((codes.shape[0], 1), model.bos, jnp.int32)
    inputs = jnp.concatenate([bos, codes[:, :-1]], axis=1)
    return model.apply({"params": params}, inputs, ctx, ctx_mask)


def test_guided_greedy_codes_follow_the_mixed_logits(prior):
    """Guidance mixes the logits, l = l_uncond + w (l_cond - l_uncond): decoding greedily,
    every code is the argmax of that mix of two full passes over the sampled prefix (one on
    the caption, one on the empty caption) computed here. w = 1 is the conditional prior
    alone and w = 0 the unconditional one. float64 as above: no argmax decided by
    round-off."""
    model, params, text, mask, null, null_mask, _ = prior
    with jax.enable_x64(True):
        model = model.clone(dtype=jnp.float64)
        params, text, null = jax.tree.map(
            lambda x: jnp.asarray(x, jnp.float64), (params, text, null)
        )
        sample = jax.jit(sample_codes, static_argnums=(0, 7))
        greedy = {}
        for w in (0.0, 1.0, 2.5):
            options = SamplingOptions(temperature=0.0, guidance=w)
            codes = sample(model, params, text, mask, null, null_mask, jax.random.key(3), options)
            cond = teacher_forced_logits(model, params, codes, text, mask)
            uncond = teacher_forced_logits(model, params, codes, null, null_mask)
            mixed = np.asarray(uncond + w * (cond - uncond))
            top2 = np.sort(mixed, axis=-1)[..., -2:]
            assert np.min(top2[..., 1] - top2[..., 0]) > 1e-6  # no ties to decide
            np.testing.assert_array_equal(np.asarray(codes), np.argmax(mixed, axis=-1))
            greedy[w] = np.asarray(codes)
        # The three scales give three different sequences (guidance does something).
        assert not np.array_equal(greedy[0.0], greedy[1.0])
        assert not np.array_equal(greedy[2.5], greedy[1.0])


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(temperature=1.5, guidance=2.0),
        SamplingOptions(temperature=0.8, top_k=3, guidance=2.0),
        SamplingOptions(temperature=1.2, top_k=5, guidance=0.0),
    ],
)
def test_first_guided_code_is_drawn_from_the_filtered_tempered_mix(prior, options):
    """The first code's frequencies over 2,000 seeds against softmax(l / T) restricted to
    the top-k of l, with l = l_uncond + w (l_cond - l_uncond) of the prior's first position
    (guidance first, then temperature and the filter)."""
    model, params, text, mask, null, null_mask, _ = prior
    w, draws = options.guidance, 2000
    keys = jax.random.split(jax.random.key(11), draws)
    first = jax.jit(
        jax.vmap(
            lambda k: sample_codes(model, params, text, mask, null, null_mask, k, options)[:, 0]
        )
    )(keys)
    codes = jnp.zeros((B, N), jnp.int32)  # only the BOS input matters for position 0
    cond = np.asarray(teacher_forced_logits(model, params, codes, text, mask)[:, 0], np.float64)
    uncond = np.asarray(
        teacher_forced_logits(model, params, codes, null, null_mask)[:, 0], np.float64
    )

    def distribution(logits):
        logits = logits / options.temperature
        if options.top_k:
            kth = np.sort(logits, axis=-1)[:, -options.top_k][:, None]
            logits = np.where(logits < kth, -np.inf, logits)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    probs = distribution(uncond + w * (cond - uncond))
    for row in range(B):
        freq = np.bincount(np.asarray(first[:, row]), minlength=K) / draws
        assert np.all(freq[probs[row] == 0] == 0)  # nothing outside the filtered mix
        # 4 standard errors of a frequency (at most 0.045 for 2,000 draws)
        np.testing.assert_allclose(freq, probs[row], atol=4 * np.sqrt(0.25 / draws))
    # ...a different distribution from the conditional prior's own (guidance matters).
    assert np.max(np.abs(distribution(cond) - probs)) > 0.05
