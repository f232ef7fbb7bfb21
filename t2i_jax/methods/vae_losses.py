"""The ELBO's terms as pure functions: KL of diagonal Gaussians, image likelihoods, bits/dim.

Images are in [-1, 1] and come from 8-bit pixels, so a pixel value v in {0..255} sits at
x = v / 127.5 - 1 and its bin is [x - 1/255, x + 1/255]. The discretised logistic
likelihood (PixelCNN++, Salimans et al. 2017) integrates a logistic density over that bin
(the edge bins reach to -inf / +inf), so it is a probability and the ELBO gives bits/dim:

  bits/dim = -log p(x) / (D ln 2),  D = H * W * 3.

The Gaussian likelihood (fixed sigma, the "MSE" VAE) is a density, reported in nats only.
Every function returns elementwise or per-example values; the method weighs and reduces.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LIKELIHOODS = ("gaussian", "logistic")
HALF_BIN = 1.0 / 255.0  # half the width of one 8-bit bin on [-1, 1]
MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor on the logistic's log-scale


def gaussian_kl(mean_q, logvar_q, mean_p=0.0, logvar_p=0.0) -> jax.Array:
    """KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p))), elementwise, in nats."""
    return 0.5 * (
        logvar_p
        - logvar_q
        + (jnp.exp(logvar_q) + jnp.square(mean_q - mean_p)) * jnp.exp(-logvar_p)
        - 1.0
    )


def gaussian_log_prob(x, mean, log_sigma) -> jax.Array:
    """log N(x; mean, sigma^2), elementwise, in nats (a density)."""
    return (
        -0.5 * math.log(2 * math.pi)
        - log_sigma
        - 0.5 * jnp.square((x - mean) * jnp.exp(-log_sigma))
    )


def discretized_logistic_log_prob(x, mean, log_scale) -> jax.Array:
    """log P(pixel bin of x) under Logistic(mean, exp(log_scale)), elementwise, in nats.

    x must lie on the 8-bit grid in [-1, 1]. Log-sigmoids are written with softplus, and a
    bin whose probability underflows float32 falls back to density * bin width.
    """
    log_scale = jnp.maximum(log_scale, MIN_LOG_SCALE)
    centred = x - mean
    inv_scale = jnp.exp(-log_scale)
    upper = inv_scale * (centred + HALF_BIN)
    lower = inv_scale * (centred - HALF_BIN)
    log_cdf_upper = upper - jax.nn.softplus(upper)  # log sigmoid(upper): the lowest bin
    log_survival_lower = -jax.nn.softplus(lower)  # log (1 - sigmoid(lower)): the highest bin
    mass = jax.nn.sigmoid(upper) - jax.nn.sigmoid(lower)
    mid = inv_scale * centred
    log_density_mid = mid - log_scale - 2.0 * jax.nn.softplus(mid)
    log_mass = jnp.where(
        mass > 1e-5,
        jnp.log(jnp.maximum(mass, 1e-12)),
        log_density_mid + math.log(2 * HALF_BIN),
    )
    return jnp.where(
        x < -1.0 + HALF_BIN,
        log_cdf_upper,
        jnp.where(x > 1.0 - HALF_BIN, log_survival_lower, log_mass),
    )


def bits_per_dim(nll_nats: jax.Array, num_dims: int) -> jax.Array:
    """Negative log-likelihood in nats over `num_dims` values -> bits per value."""
    return nll_nats / (num_dims * math.log(2.0))


def free_bits_kl(kl: jax.Array, free_bits: float) -> jax.Array:
    """Free bits (Kingma et al. 2016): KL [B, ...] -> [B], each latent dimension's
    batch-mean KL held at no less than `free_bits` nats (0: the plain KL)."""
    flat = kl.reshape(kl.shape[0], -1)
    if free_bits <= 0:
        return jnp.sum(flat, axis=1)
    per_dim = jnp.mean(flat, axis=0, keepdims=True)
    # Below the floor a dimension counts as the constant floor, so it gets no gradient.
    return jnp.sum(jnp.where(per_dim < free_bits, free_bits, flat), axis=1)


def kl_weight(step: jax.Array, beta: float, warmup_steps: int) -> jax.Array:
    """beta, ramped linearly from 0 over the first `warmup_steps` steps (KL warm-up)."""
    if warmup_steps <= 0:
        return jnp.asarray(beta, jnp.float32)
    return beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)
