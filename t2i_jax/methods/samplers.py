"""Diffusion samplers (DDPM ancestral, DDIM) as one compiled `lax.scan` over timesteps.

A sampler only needs `denoise(x_t, t) -> (x0_hat, eps_hat)`; prediction type and
classifier-free guidance live in the method, so every sampler gets them for free.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.errors import ConfigError

Denoiser = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
SAMPLERS = ("ddpm", "ddim")


def sampling_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` timesteps from T-1 down to 0, evenly spaced (all of them when equal)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ConfigError(f"sampling steps must be in [1, {num_timesteps}], got {num_steps}")
    return np.linspace(0, num_timesteps - 1, num_steps).round().astype(np.int32)[::-1].copy()


def sample_loop(
    denoise: Denoiser,
    x_T: jax.Array,
    alpha_bar: jax.Array,
    timesteps: np.ndarray,
    rng: jax.Array,
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    clip_denoised: bool = True,
) -> jax.Array:
    """Runs the reverse process from x_T along `timesteps` (descending) to x_0.

    DDIM (Song et al. 2021): x_prev = sqrt(ab') x0 + sqrt(1 - ab' - s^2) eps + s z with
    s = eta * sqrt((1 - ab') / (1 - ab) * (1 - ab / ab')). DDPM: the posterior
    q(x_prev | x_t, x0) of the (respaced) chain, mean and variance beta-tilde.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{sampler}'; choose from {SAMPLERS}")
    t_prev = np.append(timesteps[1:], -1).astype(np.int32)
    ab_all = jnp.asarray(alpha_bar, jnp.float32)

    def step(x, inputs):
        t, tp, key = inputs
        ab = ab_all[t]
        ab_prev = jnp.where(tp >= 0, ab_all[jnp.maximum(tp, 0)], 1.0)
        x0, eps = denoise(x, jnp.full((x.shape[0],), t))
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
        posterior_var = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
        noise = jax.random.normal(key, x.shape, x.dtype)
        if sampler == "ddim":
            sigma = eta * jnp.sqrt(posterior_var)
            direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0))
            x_prev = jnp.sqrt(ab_prev) * x0 + direction * eps + sigma * noise
        else:
            beta = 1.0 - ab / ab_prev
            mean = (jnp.sqrt(ab_prev) * beta / (1.0 - ab)) * x0 + (
                jnp.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab)
            ) * x
            x_prev = mean + jnp.sqrt(posterior_var) * noise  # variance is 0 at the last step
        return x_prev, None

    keys = jax.random.split(rng, len(timesteps))
    x0, _ = jax.lax.scan(step, x_T, (jnp.asarray(timesteps), jnp.asarray(t_prev), keys))
    return x0
