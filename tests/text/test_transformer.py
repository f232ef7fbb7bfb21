"""Tests for the from-scratch transformer text encoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.text.features import TextFeatures
from t2i_jax.text.transformer import TransformerTextEncoder

VOCAB, B, L = 50, 3, 8
LENGTHS = jnp.array([[3], [L], [1]])  # valid tokens per row (right padding)


def _tokens(seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, L), 0, VOCAB, dtype=jnp.int32)


def _mask() -> jax.Array:
    return jnp.arange(L)[None, :] < LENGTHS


def _model(causal: bool = False, dropout: float = 0.0) -> TransformerTextEncoder:
    return TransformerTextEncoder(
        VOCAB, width=16, depth=2, num_heads=2, max_len=L, dropout=dropout, causal=causal
    )


@functools.cache
def _params():
    """Initial params, shared by every variant (causal and dropout add no parameters)."""
    key = jax.random.key(0, impl="unsafe_rbg")  # compiles much faster than threefry on CPU
    return jax.jit(_model().init)(key, _tokens(), _mask())["params"]


@functools.cache
def _encoder(causal: bool, dropout: float = 0.0):
    """A jitted forward `fwd(tokens, mask, rng=None)`; with an rng it runs in training mode."""
    model, params = _model(causal, dropout), _params()

    @jax.jit
    def fwd(tokens, mask, rng=None):
        rngs = None if rng is None else {"dropout": rng}
        return model.apply({"params": params}, tokens, mask, train=rng is not None, rngs=rngs)

    return model, params, fwd


def test_shapes() -> None:
    _, _, fwd = _encoder(causal=False)
    feats = fwd(_tokens(), _mask())
    assert isinstance(feats, TextFeatures)
    assert feats.seq.shape == (B, L, 16) and feats.seq.dtype == jnp.float32
    assert feats.pooled.shape == (B, 16)
    assert feats.mask.shape == (B, L) and feats.mask.dtype == jnp.bool_
    # Padded positions are zero; pooled is the mean over valid ones.
    np.testing.assert_array_equal(feats.seq[0, 3:], 0.0)
    np.testing.assert_allclose(feats.pooled[0], feats.seq[0, :3].mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(causal: bool) -> None:
    _, _, fwd = _encoder(causal=causal)
    mask = _mask()
    a = fwd(_tokens(0), mask)
    b = fwd(jnp.where(mask, _tokens(0), _tokens(1)), mask)
    assert not np.array_equal(jnp.where(mask, _tokens(0), _tokens(1)), _tokens(0))
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(a.seq)[valid], np.asarray(b.seq)[valid], atol=1e-6)
    np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_causality(causal: bool) -> None:
    _, _, fwd = _encoder(causal=causal)
    mask = jnp.ones((B, L), bool)
    i = 4
    changed = _tokens(0).at[:, i + 1 :].set(_tokens(1)[:, i + 1 :])
    a, b = fwd(_tokens(0), mask).seq, fwd(changed, mask).seq
    prefix_diff = float(jnp.abs(a[:, : i + 1] - b[:, : i + 1]).max())
    if causal:
        assert prefix_diff <= 1e-6
    else:  # the bidirectional encoder does see later tokens
        assert prefix_diff > 1e-4


def test_jit_deterministic_and_dropout() -> None:
    _, _, fwd = _encoder(causal=False, dropout=0.3)
    tokens, mask = _tokens(), _mask()
    a, b = fwd(tokens, mask), fwd(tokens, mask)
    np.testing.assert_array_equal(a.seq, b.seq)
    np.testing.assert_array_equal(a.pooled, b.pooled)
    k1, k2 = jax.random.key(1, impl="unsafe_rbg"), jax.random.key(2, impl="unsafe_rbg")
    np.testing.assert_array_equal(fwd(tokens, mask, k1).pooled, fwd(tokens, mask, k1).pooled)
    assert float(jnp.abs(fwd(tokens, mask, k1).pooled - fwd(tokens, mask, k2).pooled).max()) > 0


@pytest.mark.parametrize("causal", [False, True])
def test_all_masked_row_is_finite(causal: bool) -> None:
    _, _, fwd = _encoder(causal=causal)
    mask = _mask().at[2].set(False)
    feats = fwd(_tokens(), mask)
    assert bool(jnp.all(jnp.isfinite(feats.seq))) and bool(jnp.all(jnp.isfinite(feats.pooled)))
    np.testing.assert_array_equal(feats.pooled[2], 0.0)


def test_too_long_raises() -> None:
    model, params, _ = _encoder(causal=False)
    tokens = jnp.zeros((1, L + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        model.apply({"params": params}, tokens, jnp.ones((1, L + 1), bool))
