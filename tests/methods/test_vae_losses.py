"""The ELBO's terms against closed forms, Monte Carlo and torch.distributions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from t2i_jax.methods import vae_losses as L

PIXELS = np.arange(256) / 127.5 - 1.0  # the 8-bit grid on [-1, 1]


def test_gaussian_kl_matches_torch_distributions():
    rng = np.random.default_rng(0)
    mq, mp = rng.normal(size=(2, 50))
    lq, lp = rng.normal(size=(2, 50))
    ours = L.gaussian_kl(jnp.asarray(mq), jnp.asarray(lq), jnp.asarray(mp), jnp.asarray(lp))
    normal = torch.distributions.Normal
    q = normal(torch.tensor(mq), torch.tensor(np.exp(0.5 * lq)))
    p = normal(torch.tensor(mp), torch.tensor(np.exp(0.5 * lp)))
    reference = torch.distributions.kl_divergence(q, p).numpy()
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-5, atol=1e-6)


def test_gaussian_kl_matches_monte_carlo():
    mq, lq, mp, lp = 0.7, math.log(0.3), -0.4, math.log(2.0)
    z = np.random.default_rng(1).normal(mq, math.exp(0.5 * lq), size=2_000_000)
    log_q = L.gaussian_log_prob(z, mq, 0.5 * lq)
    log_p = L.gaussian_log_prob(z, mp, 0.5 * lp)
    estimate = float(np.mean(log_q - log_p))
    closed = float(L.gaussian_kl(mq, lq, mp, lp))
    # Monte Carlo standard error here is ~1e-3 (2M samples); 5e-3 is five of them.
    assert abs(estimate - closed) < 5e-3
    assert float(L.gaussian_kl(0.0, 0.0)) == 0.0


@pytest.mark.parametrize("mean, log_scale", [(0.0, -2.0), (0.93, -4.0), (-1.2, 0.5), (0.3, -7.0)])
def test_discretized_logistic_sums_to_one_over_256_values(mean, log_scale):
    x = jnp.asarray(PIXELS, jnp.float32)
    log_p = L.discretized_logistic_log_prob(x, jnp.float32(mean), jnp.float32(log_scale))
    assert np.all(np.isfinite(np.asarray(log_p)))
    total = float(np.sum(np.exp(np.asarray(log_p, np.float64))))
    assert abs(total - 1.0) < 1e-4  # float32 log-probabilities of 256 bins


def test_discretized_logistic_equals_cdf_differences():
    mean, scale = 0.1, 0.2
    logistic_cdf = lambda v: 1.0 / (1.0 + np.exp(-(v - mean) / scale))
    upper = np.where(PIXELS > 1 - 1 / 255, 1.0, logistic_cdf(PIXELS + 1 / 255))
    lower = np.where(PIXELS < -1 + 1 / 255, 0.0, logistic_cdf(PIXELS - 1 / 255))
    reference = np.log(upper - lower)
    ours = L.discretized_logistic_log_prob(
        jnp.asarray(PIXELS, jnp.float32), jnp.float32(mean), jnp.float32(math.log(scale))
    )
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-4, atol=1e-5)


def test_discretized_logistic_is_finite_for_a_sharp_or_far_logistic():
    x = jnp.asarray(PIXELS, jnp.float32)
    for mean, log_scale in [(5.0, -7.0), (-0.5, -7.0), (0.0, 3.0)]:
        log_p = L.discretized_logistic_log_prob(x, jnp.float32(mean), jnp.float32(log_scale))
        total = lambda m, s: jnp.sum(L.discretized_logistic_log_prob(x, m, s))
        grads = jax.grad(total)(jnp.float32(mean), jnp.float32(log_scale))
        assert np.all(np.isfinite(np.asarray(log_p))) and np.isfinite(float(grads))


def test_bits_per_dim_of_a_uniform_8_bit_model_is_8():
    dims = 32 * 32 * 3
    nll = dims * math.log(256.0)  # every value with probability 1/256
    assert float(L.bits_per_dim(jnp.float32(nll), dims)) == pytest.approx(8.0, rel=1e-6)


def test_free_bits_hold_small_dimensions_at_the_floor_without_gradient():
    kl = jnp.asarray([[0.01, 2.0], [0.03, 4.0]])  # dim 0 averages 0.02 nats, dim 1 3 nats
    np.testing.assert_allclose(np.asarray(L.free_bits_kl(kl, 0.0)), [2.01, 4.03], rtol=1e-6)
    floored = L.free_bits_kl(kl, 0.5)
    np.testing.assert_allclose(np.asarray(floored), [2.5, 4.5], rtol=1e-6)
    grad = jax.grad(lambda k: jnp.sum(L.free_bits_kl(k, 0.5)))(kl)
    np.testing.assert_array_equal(np.asarray(grad), [[0.0, 1.0], [0.0, 1.0]])


def test_kl_warmup_ramps_linearly_to_beta():
    weights = [float(L.kl_weight(jnp.int32(s), 0.5, 100)) for s in (0, 50, 100, 400)]
    assert weights == [0.0, 0.25, 0.5, 0.5]
    assert float(L.kl_weight(jnp.int32(0), 0.5, 0)) == 0.5
