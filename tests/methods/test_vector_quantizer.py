"""VQ-VAE's quantiser: nearest codes, straight-through gradient, EMA codebook, restarts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.methods import vector_quantizer as vq


def test_nearest_codes_equal_brute_force():
    rng = np.random.default_rng(0)
    z, codebook = rng.normal(size=(100, 5)), rng.normal(size=(16, 5))
    brute = np.argmin(((z[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)
    got = vq.nearest_codes(jnp.asarray(z, jnp.float32), jnp.asarray(codebook, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), brute)


def test_straight_through_passes_values_forward_and_the_identity_backward():
    z = jnp.asarray([[0.2, -1.0], [3.0, 0.5]])
    e = jnp.asarray([[0.0, -1.0], [2.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(vq.straight_through(z, e)), np.asarray(e))
    weights = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    grad = jax.grad(lambda v: jnp.sum(weights * vq.straight_through(v, e)))(z)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))
    # The commitment loss moves z toward the code, never the code toward z.
    g_z, g_e = jax.grad(lambda a, b: jnp.sum(vq.commitment_loss(a, b)), argnums=(0, 1))(z, e)
    np.testing.assert_allclose(np.asarray(g_z), np.asarray(z - e), rtol=1e-6)  # 2(z-e)/2
    assert not np.any(np.asarray(g_e))


def test_ema_update_equals_a_hand_computation():
    decay, eps = 0.9, 1e-5
    state = {
        "codebook": jnp.asarray([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]),
        "cluster_size": jnp.asarray([2.0, 1.0, 0.5]),
        "embed_sum": jnp.asarray([[0.2, 0.0], [1.0, 1.0], [2.5, 2.5]]),
    }
    z = jnp.asarray([[0.1, -0.1], [0.3, 0.1], [1.2, 0.8]])
    codes = jnp.asarray([0, 0, 1])  # code 2 gets nothing this step
    new = vq.ema_update(state, z, codes, decay=decay, eps=eps)
    # By hand: counts (2, 1, 0); sums ((0.4, 0), (1.2, 0.8), (0, 0)).
    size = np.array([0.9 * 2 + 0.1 * 2, 0.9 * 1 + 0.1 * 1, 0.9 * 0.5])
    sums = np.array([[0.9 * 0.2 + 0.1 * 0.4, 0.0], [0.9 + 0.12, 0.9 + 0.08], [2.25, 2.25]])
    n = size.sum()
    smoothed = (size + eps) / (n + 3 * eps) * n
    np.testing.assert_allclose(np.asarray(new["cluster_size"]), size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["embed_sum"]), sums, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["codebook"]), sums / smoothed[:, None], rtol=1e-5)


def test_ema_codebook_converges_to_cluster_means():
    """Two well-separated clusters, codes started off-centre: the EMA codes move onto the
    cluster means (k-means with a moving average)."""
    key = jax.random.key(0)
    centres = jnp.asarray([[-3.0, 0.0], [3.0, 1.0]])
    state = {
        "codebook": jnp.asarray([[-1.0, 0.0], [1.0, 0.0]]),
        "cluster_size": jnp.ones((2,)),
        "embed_sum": jnp.asarray([[-1.0, 0.0], [1.0, 0.0]]),
    }
    for step in range(300):
        k1, k2 = jax.random.split(jax.random.fold_in(key, step))
        which = jax.random.bernoulli(k1, 0.5, (64,)).astype(jnp.int32)
        z = centres[which] + 0.1 * jax.random.normal(k2, (64, 2))
        state = vq.ema_update(state, z, vq.nearest_codes(z, state["codebook"]), decay=0.9, eps=1e-5)
    np.testing.assert_allclose(np.asarray(state["codebook"]), np.asarray(centres), atol=0.05)


def test_dead_codes_restart_on_batch_outputs_and_live_codes_stay():
    state = {
        "codebook": jnp.asarray([[0.0, 0.0], [9.0, 9.0], [1.0, 1.0]]),
        "cluster_size": jnp.asarray([5.0, 1e-4, 2.0]),  # code 1 is dead
        "embed_sum": jnp.asarray([[0.0, 0.0], [9e-4, 9e-4], [2.0, 2.0]]),
    }
    z = jnp.asarray([[0.5, 0.4], [0.7, 0.2], [1.1, 0.9]])
    new, restarted = vq.restart_dead_codes(state, z, jax.random.key(0), threshold=0.01)
    assert int(restarted) == 1
    moved = np.asarray(new["codebook"][1])
    assert any(np.array_equal(moved, row) for row in np.asarray(z))  # a batch output
    np.testing.assert_array_equal(np.asarray(new["codebook"])[[0, 2]], [[0, 0], [1, 1]])
    assert float(new["cluster_size"][1]) == pytest.approx(0.01)
    # Its sum matches its count, so the next EMA step keeps it where it was put.
    np.testing.assert_allclose(np.asarray(new["embed_sum"][1]), moved * 0.01, rtol=1e-6)


def test_perplexity_is_k_when_uniform_and_1_when_collapsed():
    uniform = vq.usage(jnp.arange(64) % 8, 8)
    collapsed = vq.usage(jnp.zeros((64,), jnp.int32), 8)
    assert float(uniform["perplexity"]) == pytest.approx(8.0, rel=1e-5)
    assert float(uniform["codes_used"]) == 1.0
    assert float(collapsed["perplexity"]) == pytest.approx(1.0)
    assert float(collapsed["codes_used"]) == pytest.approx(1 / 8)
