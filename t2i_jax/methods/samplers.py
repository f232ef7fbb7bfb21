"""Diffusion samplers, each one compiled `lax.scan`: DDPM ancestral, DDIM and
DPM-Solver++(2M) over evenly spaced timesteps; Euler and Heun over Karras et al.'s sigmas.

A sampler only needs `denoise(x_t, t, alpha_bar_t) -> (x0_hat, eps_hat)`: `t` [B] is the
timestep the network is told (fractional between the schedule's steps on Karras sigmas),
`alpha_bar_t` the noise level of x_t. Prediction type and classifier-free guidance live in
the method, so every sampler gets them for free.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.errors import ConfigError

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
ODE = ("euler", "heun", "dpmpp_2m")  # probability-flow ODE solvers (`ode_loop`)
KARRAS = ("euler", "heun")  # ... over Karras sigmas; the others over `sampling_timesteps`
SAMPLERS = ("ddpm", "ddim", *ODE)
KARRAS_RHO = 7.0  # Karras et al. (2022), eq. 5
# Karras et al.'s sigma_max. A cosine schedule's last step has sigma ~ 2e4 (8e4 shifted by 4):
# from there, rho = 7 spacing spends most steps where x is noise to 1 part in 100 or more
# (10 Heun steps from 8e4: 7 of them at t >= 983 of 1000).
EDM_SIGMA_MAX = 80.0


def sampling_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` timesteps from T-1 down to 0, evenly spaced (all of them when equal)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ConfigError(f"sampling steps must be in [1, {num_timesteps}], got {num_steps}")
    return np.linspace(0, num_timesteps - 1, num_steps).round().astype(np.int32)[::-1].copy()


def schedule_sigmas(alpha_bar) -> np.ndarray:
    """sigma_t = sqrt((1 - ab_t) / ab_t), float64 [T]: x_t / sqrt(ab_t) = x_0 + sigma_t eps,
    the variance-exploding view of the same chain."""
    # A zero-terminal-SNR schedule's last step has sigma = inf: the ODE samplers start it
    # at ab = 2^-24 instead (sigma ~ 4096), as diffusers' do.
    ab = np.asarray(alpha_bar, np.float64)
    ab = np.where(ab > 0.0, ab, 2.0**-24)
    return np.sqrt((1.0 - ab) / ab)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """`num_steps` sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho),
    then 0 (float64 [num_steps + 1])."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return np.append((hi + ramp * (lo - hi)) ** KARRAS_RHO, 0.0)


def timestep_of_sigma(sigma: np.ndarray, alpha_bar) -> np.ndarray:
    """The fractional timestep of each sigma: log sigma interpolated linearly between the
    schedule's steps (k-diffusion's discrete-schedule wrapper)."""
    log_sigmas = np.log(schedule_sigmas(alpha_bar))
    return np.interp(np.log(sigma), log_sigmas, np.arange(len(log_sigmas), dtype=np.float64))


def check_sampler(sampler: str, eta: float = 0.0) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{sampler}'; choose from {SAMPLERS}")
    if sampler in ODE and eta:
        raise ConfigError(f"eta={eta} is DDIM's noise; the {sampler} sampler is deterministic")


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
    sigma_max: float = 0.0,
) -> jax.Array:
    """Runs the reverse process from x_T ~ N(0, I) to x_0 in `len(timesteps)` steps.

    DDIM (Song et al. 2021): x_prev = sqrt(ab') x0 + sqrt(1 - ab' - s^2) eps + s z with
    s = eta * sqrt((1 - ab') / (1 - ab) * (1 - ab / ab')). DDPM: the posterior
    q(x_prev | x_t, x0) of the (respaced) chain, mean and variance beta-tilde. Both step
    along `timesteps` (descending), as DPM-Solver++(2M) does; Euler and Heun take as many
    Karras sigmas instead (`ode_loop`, for which `alpha_bar` must be concrete: it is the
    method's constant), from `sigma_max` (0: the schedule's largest; capped at it) down to
    the schedule's smallest. Starting below the schedule's largest sigma treats x there as
    pure noise: for data of mean m and std s the samples' mean is off by about m s / sigma_max.
    """
    check_sampler(sampler, eta)
    if sampler in ODE:
        sigmas_t = schedule_sigmas(alpha_bar)
        if sampler in KARRAS:
            top = min(sigma_max, sigmas_t[-1]) if sigma_max > 0 else sigmas_t[-1]
            sigmas = karras_sigmas(sigmas_t[0], top, len(timesteps))[:-1]
            steps = timestep_of_sigma(sigmas, alpha_bar)
        else:
            sigmas, steps = sigmas_t[timesteps], timesteps
        return ode_loop(denoise, x_T, sigmas, steps, sampler, clip_denoised)
    t_prev = np.append(timesteps[1:], -1).astype(np.int32)
    ab_all = jnp.asarray(alpha_bar, jnp.float32)

    def step(x, inputs):
        t, tp, key = inputs
        ab = ab_all[t]
        ab_prev = jnp.where(tp >= 0, ab_all[jnp.maximum(tp, 0)], 1.0)
        t_batch = jnp.full((x.shape[0],), t)
        x0, eps = denoise(x, t_batch, ab_all[t_batch])
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


def ode_loop(
    denoise: Denoiser,
    x_T: jax.Array,
    sigmas: np.ndarray,
    timesteps: np.ndarray,
    sampler: str,
    clip_denoised: bool = True,
) -> jax.Array:
    """Deterministic solvers of the probability-flow ODE dx/dsigma = (x - D(x)) / sigma in
    the variance-exploding variable x = x_t / sqrt(ab_t), down the descending positive
    `sigmas` (the network told `timesteps`), then to 0.

    euler: x' = x + (s' - s) d, d = (x - D(x, s)) / s (Karras et al. 2022, Alg. 1 without
    its second order). heun: that step corrected by d at (x', s'): 2 network calls a step,
    1 for the last. dpmpp_2m: DPM-Solver++(2M) (Lu et al. 2022), the data prediction
    extrapolated from the last two, with h = log(s / s'); its first step is first order,
    which is DDIM's. Every one ends with x_0 = D(x, sigmas[-1]). x_T ~ N(0, I) starts at
    sqrt(1 + sigma_max^2) x_T, the variance of the chain's last step (diffusers'
    `init_noise_sigma`).
    """
    batch = x_T.shape[0]

    def data(x, sigma, t):
        """D(x, sigma): the (guided) x0 prediction at the VE point x of level sigma."""
        ab = 1.0 / (1.0 + sigma**2)
        x0, _ = denoise(x * jnp.sqrt(ab), jnp.full((batch,), t), jnp.full((batch,), ab))
        return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

    # DPM-Solver++(2M) uses D_d = (1 + c) D_i - c D_{i-1} with c = 1 / (2 r), r = h_{i-1} / h_i
    # (Lu et al.'s notation; h_i = log(s_i / s_{i+1})); c = 0 at the first step.
    sigmas = np.asarray(sigmas, np.float64)
    h = np.log(sigmas[:-1] / sigmas[1:])
    extrapolate = np.zeros(len(h))
    extrapolate[1:] = h[1:] / (2.0 * h[:-1])

    def f32(a):
        return jnp.asarray(a, jnp.float32)

    steps = (f32(sigmas[:-1]), f32(sigmas[1:]), f32(timesteps[:-1]), f32(timesteps[1:]))
    steps += (f32(extrapolate),)

    def step(carry, inputs):
        x, previous = carry
        sigma, sigma_next, t, t_next, c = inputs
        denoised = data(x, sigma, t)
        if sampler == "dpmpp_2m":
            denoised_d = (1.0 + c) * denoised - c * previous
            x_next = (sigma_next / sigma) * x + (1.0 - sigma_next / sigma) * denoised_d
        else:
            slope = (x - denoised) / sigma
            x_next = x + (sigma_next - sigma) * slope
            if sampler == "heun":
                slope_next = (x_next - data(x_next, sigma_next, t_next)) / sigma_next
                x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        return (x_next, denoised), None

    x = x_T * jnp.sqrt(1.0 + f32(sigmas[0]) ** 2)
    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), steps)
    return data(x, f32(sigmas[-1]), f32(timesteps[-1]))  # the last step, to sigma = 0
