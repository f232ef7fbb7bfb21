"""Discrete-time noise schedules and the forward process q(x_t | x_0).

`alphas_cumprod[t]` is alpha_bar_t for t = 0..T-1 (t = 0 is the first noising step), so
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.errors import ConfigError


def linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """DDPM (Ho et al. 2020); the endpoints are for T = 1000, so scale them with T."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM (Nichol & Dhariwal 2021), betas clipped at 0.999 near t = T."""

    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2

    t = np.arange(num_timesteps + 1, dtype=np.float64)
    alpha_bar = f(t) / f(np.zeros(1))
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def alphas_cumprod(
    name: str, num_timesteps: int, zero_terminal_snr: bool = False, shift: float = 1.0
) -> np.ndarray:
    if name not in SCHEDULES:
        raise ConfigError(f"unknown diffusion.schedule '{name}'; choose from {sorted(SCHEDULES)}")
    if not shift > 0:
        raise ConfigError(f"diffusion.schedule_shift must be positive, got {shift}")
    alpha_bar = shift_snr(np.cumprod(1.0 - SCHEDULES[name](num_timesteps)), shift)
    return rescale_zero_terminal_snr(alpha_bar) if zero_terminal_snr else alpha_bar


def shift_snr(alpha_bar: np.ndarray, shift: float) -> np.ndarray:
    """The schedule with every step's SNR divided by shift^2: ab / (ab + shift^2 (1 - ab)).

    The resolution shift of simple diffusion (Hoogeboom et al. 2023): at the same per-pixel
    SNR a larger image keeps more of its coarse layout (averaging k x k pixels multiplies
    their SNR by k^2), so a schedule made for d x d images suits (shift d) x (shift d) ones
    only with its SNR divided by shift^2. Shift 1 is the schedule itself."""
    if shift == 1.0:
        return alpha_bar
    return alpha_bar / (alpha_bar + shift**2 * (1.0 - alpha_bar))


def rescale_zero_terminal_snr(alpha_bar: np.ndarray) -> np.ndarray:
    """Lin et al. (2024), Alg. 1: sqrt(alpha_bar) shifted and scaled so that the last step
    is pure noise (SNR 0, as the sampler's start x_T ~ N(0, I) assumes) and the first keeps
    its value. Needs v-prediction: eps-prediction cannot give x0 at SNR 0."""
    root = np.sqrt(alpha_bar)
    first, last = root[0], root[-1]
    return ((root - last) * first / (first - last)) ** 2


def min_snr_weight(alpha_bar_t: jax.Array, gamma: float, prediction: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for eps- and
    min(SNR, gamma) / (SNR + 1) for v-prediction, SNR = ab / (1 - ab). Both turn the
    loss into the x0 error weighted by min(SNR, gamma): high-SNR steps stop dominating."""
    snr = alpha_bar_t / (1.0 - alpha_bar_t)
    clipped = jnp.minimum(snr, gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1.0)
    raise ConfigError(f"unknown diffusion.prediction '{prediction}'; choose eps or v")


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """Draws x_t ~ q(x_t | x_0) given the noise; t is an int array [B]."""
    ab = alpha_bar[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.reshape(a, jnp.shape(a) + (1,) * (like.ndim - jnp.ndim(a)))


def to_x0_eps(
    output: jax.Array, x_t: jax.Array, alpha_bar_t: jax.Array, prediction: str
) -> tuple[jax.Array, jax.Array]:
    """Converts the network's output (eps or v) to (x0, eps) estimates."""
    ab = _bcast(alpha_bar_t, x_t)
    if prediction == "eps":
        eps = output
        x0 = (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
    elif prediction == "v":  # v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022).
        x0 = jnp.sqrt(ab) * x_t - jnp.sqrt(1.0 - ab) * output
        eps = jnp.sqrt(1.0 - ab) * x_t + jnp.sqrt(ab) * output
    else:
        raise ConfigError(f"unknown diffusion.prediction '{prediction}'; choose eps or v")
    return x0, eps


def target(x0: jax.Array, noise: jax.Array, alpha_bar_t: jax.Array, prediction: str) -> jax.Array:
    """The regression target of the denoising loss for eps- or v-prediction."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        ab = _bcast(alpha_bar_t, x0)
        return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0
    raise ConfigError(f"unknown diffusion.prediction '{prediction}'; choose eps or v")
