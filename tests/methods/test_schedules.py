import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.methods import schedules


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_is_the_closed_form_of_the_markov_chain(name):
    """Iterating q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t) gives mean and variance
    sqrt(alpha_bar_t) x_0 and 1 - alpha_bar_t."""
    T = 1000
    betas = schedules.SCHEDULES[name](T)
    alpha_bar = schedules.alphas_cumprod(name, T)
    x0, mean, var = 0.7, 0.7, 0.0
    for t in range(T):
        mean = np.sqrt(1 - betas[t]) * mean
        var = (1 - betas[t]) * var + betas[t]
        np.testing.assert_allclose(mean, np.sqrt(alpha_bar[t]) * x0, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var, 1 - alpha_bar[t], rtol=1e-10)
    assert np.all(np.diff(alpha_bar) < 0) and 0 < alpha_bar[-1] < 1e-3


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_matches_closed_form_mean_and_variance(t):
    alpha_bar = jnp.asarray(schedules.alphas_cumprod("cosine", 1000), jnp.float32)
    n = 200_000
    x0 = jnp.full((n, 1), 0.5)
    noise = jax.random.normal(jax.random.key(0), (n, 1))
    x_t = schedules.q_sample(x0, jnp.full((n,), t), noise, alpha_bar)
    ab = float(alpha_bar[t])
    # Monte Carlo: standard error of the mean is sqrt(var / n) ~ 2e-3; 5 sigma bounds.
    se = np.sqrt((1 - ab) / n)
    assert abs(float(x_t.mean()) - np.sqrt(ab) * 0.5) < 5 * se + 1e-6
    assert abs(float(x_t.var()) - (1 - ab)) < 5 * (1 - ab) * np.sqrt(2 / n) + 1e-6


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_target_and_inverse_recover_x0_and_noise(prediction):
    alpha_bar = jnp.asarray(schedules.alphas_cumprod("linear", 1000), jnp.float32)
    k1, k2 = jax.random.split(jax.random.key(1))
    x0 = jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 10, 500, 900])
    x_t = schedules.q_sample(x0, t, noise, alpha_bar)
    out = schedules.target(x0, noise, alpha_bar[t], prediction)
    x0_hat, eps_hat = schedules.to_x0_eps(out, x_t, alpha_bar[t], prediction)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-4)
    # x0 from eps divides by sqrt(alpha_bar), which is ~0.2 at t=900: error grows by 1/0.2.
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
