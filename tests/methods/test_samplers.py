import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.methods import samplers, schedules

ALPHA_BAR = jnp.asarray(schedules.alphas_cumprod("cosine", 1000), jnp.float32)


def gaussian_denoiser(scale: float, mean: float = 0.0):
    """The exact E[x0 | x_t] for data x0 ~ N(mean, scale^2 I), at the noise level ab."""

    def denoise(x_t, t, ab):
        del t  # the exact denoiser needs only the noise level
        ab = ab[:, None]
        gain = jnp.sqrt(ab) * scale**2 / (ab * scale**2 + 1 - ab)
        x0 = mean + gain * (x_t - jnp.sqrt(ab) * mean)
        eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        return x0, eps

    return denoise


def run(sampler, steps, key, eta=0.0, scale=0.5, n=20_000, x_T=None):
    x_T = jax.random.normal(jax.random.key(7), (n, 1)) if x_T is None else x_T
    timesteps = samplers.sampling_timesteps(1000, steps)
    fn = jax.jit(
        lambda x, k: samplers.sample_loop(
            gaussian_denoiser(scale),
            x,
            ALPHA_BAR,
            timesteps,
            k,
            sampler=sampler,
            eta=eta,
            clip_denoised=False,
        )
    )
    return fn(x_T, key)


def test_timesteps_descend_and_cover_the_range():
    ts = samplers.sampling_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0) and len(ts) == 50
    np.testing.assert_array_equal(samplers.sampling_timesteps(1000, 1000), np.arange(999, -1, -1))


def test_ddim_eta0_is_deterministic_and_ignores_the_key():
    a = run("ddim", 25, jax.random.key(0), n=64)
    b = run("ddim", 25, jax.random.key(123), n=64)
    np.testing.assert_array_equal(a, b)
    c = run("ddpm", 25, jax.random.key(0), n=64)
    d = run("ddpm", 25, jax.random.key(123), n=64)
    assert not np.allclose(c, d)


@pytest.mark.parametrize(
    "sampler,steps,eta",
    [("ddpm", 1000, 0.0), ("ddpm", 100, 0.0), ("ddim", 50, 0.0), ("ddim", 100, 1.0)],
)
def test_samplers_reach_the_data_distribution(sampler, steps, eta):
    """With the exact denoiser of N(0, 0.5^2), samples must have std 0.5."""
    x = run(sampler, steps, jax.random.key(3), eta=eta)
    assert abs(float(x.mean())) < 0.02
    # Few-step samplers carry a discretisation bias; 4% of the std is a loose bound
    # that still fails if a coefficient is wrong (those give errors of 10% or more).
    assert abs(float(x.std()) - 0.5) < 0.02


def test_clipping_keeps_x0_in_range():
    x_T = 3.0 * jax.random.normal(jax.random.key(0), (256, 1))
    timesteps = samplers.sampling_timesteps(1000, 10)
    x = samplers.sample_loop(
        gaussian_denoiser(4.0),
        x_T,
        ALPHA_BAR,
        timesteps,
        jax.random.key(0),
        sampler="ddim",
        clip_denoised=True,
    )
    assert float(jnp.abs(x).max()) <= 1.0 + 1e-5


# -- probability-flow ODE samplers ------------------------------------------------------


def test_karras_sigmas_span_the_schedule_and_end_at_zero():
    sigmas_t = samplers.schedule_sigmas(ALPHA_BAR)
    sigmas = samplers.karras_sigmas(sigmas_t[0], sigmas_t[-1], 10)
    assert len(sigmas) == 11 and sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0)
    np.testing.assert_allclose(sigmas[[0, 9]], sigmas_t[[-1, 0]], rtol=1e-12)
    # Evenly spaced in sigma^(1/7).
    gaps = np.diff(sigmas[:-1] ** (1 / 7))
    np.testing.assert_allclose(gaps, np.full(9, gaps[0]), rtol=1e-9)
    # Each sigma's fractional timestep lands on its level of the schedule.
    t = samplers.timestep_of_sigma(sigmas[:-1], ALPHA_BAR)
    np.testing.assert_allclose(t[[0, -1]], [999, 0], atol=1e-9)  # sigma^(1/7)^7 round-off
    np.testing.assert_allclose(samplers.timestep_of_sigma(sigmas_t[[3, 500]], ALPHA_BAR), [3, 500])


def exact_flow(scale: float, mean: float, sigma_max: float) -> tuple[float, float]:
    """(a, b) of x_0 = a x_T + b, the exact probability-flow ODE of data N(mean, scale^2)
    from x = sqrt(1 + sigma_max^2) x_T at sigma_max down to 0: in the VE variable,
    x(sigma) - mean = (x(sigma_max) - mean) sqrt((scale^2 + sigma^2) / (scale^2 + sigma_max^2))."""
    shrink = scale / np.sqrt(scale**2 + sigma_max**2)
    return float(np.sqrt(1 + sigma_max**2) * shrink), float(mean * (1 - shrink))


# The error of (a, b) at 20 and 40 steps, measured 2026-12-07: euler 0.15, 0.083 (first
# order: halves); heun 0.16, 0.033 and dpmpp_2m 0.050, 0.013 (second order: quarters).
@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_ode_samplers_solve_the_gaussian_flow_to_their_order(sampler, order):
    """On data N(0.3, 0.5^2) the exact denoiser is affine, so each deterministic sampler is
    an affine map x_0 = a x_T + b and its output distribution is N(b, a^2): compare a and
    b with the exact ODE's (N(0.3, 0.5^2) up to 1 / sigma_max ~ 1e-4). The error falls
    with every doubling of the steps, and from 20 to 40 steps by the solver's order: to at
    most 0.6 of itself for first order, 0.3 for second (exactly 1/2 and 1/4 in the limit)."""
    scale, mean = 0.5, 0.3
    sigma_max = samplers.schedule_sigmas(ALPHA_BAR)[-1]
    a_exact, b_exact = exact_flow(scale, mean, sigma_max)
    np.testing.assert_allclose([a_exact, b_exact], [scale, mean], atol=2e-4)
    errors = []
    for steps in (5, 10, 20, 40):
        timesteps = samplers.sampling_timesteps(1000, steps)
        out = samplers.sample_loop(gaussian_denoiser(scale, mean), jnp.asarray([[0.0], [1.0]]),
                                   ALPHA_BAR, timesteps, jax.random.key(0), sampler=sampler,
                                   clip_denoised=False)  # fmt: skip
        b, a_plus_b = (float(v) for v in out[:, 0])
        errors.append(max(abs(a_plus_b - b - a_exact), abs(b - b_exact)))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[3] < {1: 0.6, 2: 0.3}[order] * errors[2], errors


def flow_error(sampler: str, steps: int, sigma_max: float, scale=0.5, mean=0.3) -> float:
    """max |a - a*|, |b - b*| of the sampler's affine map against the exact flow from
    where it starts (`sigma_max`, 0: the schedule's largest)."""
    top = samplers.schedule_sigmas(ALPHA_BAR)[-1]
    a_exact, b_exact = exact_flow(scale, mean, min(sigma_max, top) if sigma_max else top)
    out = samplers.sample_loop(gaussian_denoiser(scale, mean), jnp.asarray([[0.0], [1.0]]),
                               ALPHA_BAR, samplers.sampling_timesteps(1000, steps),
                               jax.random.key(0), sampler=sampler, clip_denoised=False,
                               sigma_max=sigma_max)  # fmt: skip
    b, a_plus_b = (float(v) for v in out[:, 0])
    return max(abs(a_plus_b - b - a_exact), abs(b - b_exact))


# Measured 2026-12-07 at 5 / 10 / 20 / 40 steps, from the cosine schedule's last sigma (2e4)
# and from 80: euler 0.47 / 0.23 / 0.15 / 0.083 and 0.23 / 0.13 / 0.066 / 0.033; heun
# 4.9 / 1.0 / 0.16 / 0.033 and 0.74 / 0.097 / 0.020 / 0.0043.
@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2)])
def test_karras_samplers_from_sigma_80_solve_the_flow_closer_in_as_many_steps(sampler, order):
    """From the schedule's largest sigma, rho = 7 spacing spends most steps where x is
    noise to 1 part in 100 or more; from 80 (Karras et al.'s sigma_max) every step count
    tracks the exact flow (from 80: N(0.3, 0.5^2) up to m s / 80) more closely, still
    converging to the solver's order."""
    from_top = [flow_error(sampler, k, 0.0) for k in (5, 10, 20, 40)]
    from_80 = [flow_error(sampler, k, samplers.EDM_SIGMA_MAX) for k in (5, 10, 20, 40)]
    assert all(a < b for a, b in zip(from_80, from_top, strict=True)), (from_80, from_top)
    assert all(b < a for a, b in zip(from_80, from_80[1:], strict=False)), from_80
    assert from_80[3] < {1: 0.6, 2: 0.3}[order] * from_80[2], from_80
    assert from_80[2] < 0.5 * from_top[2], (from_80, from_top)


def test_a_sigma_max_above_the_schedule_is_the_schedule_s():
    x_T = jax.random.normal(jax.random.key(1), (16, 1))
    for sampler in samplers.KARRAS:
        top, above = (
            samplers.sample_loop(
                gaussian_denoiser(0.5),
                x_T,
                ALPHA_BAR,
                samplers.sampling_timesteps(1000, 6),
                jax.random.key(0),
                sampler=sampler,
                sigma_max=cap,
            )  # fmt: skip
            for cap in (0.0, 1e9)
        )
        np.testing.assert_array_equal(top, above)


def test_dpmpp_2m_in_two_steps_is_ddim():
    """Its first step is first order, which is DDIM's (eta 0) step, and its last is x_0 = D:
    with two steps the two samplers are the same map, computed in other variables."""
    x_T = jax.random.normal(jax.random.key(1), (64, 1))
    ddim, dpm = (run(s, 2, jax.random.key(0), x_T=x_T) for s in ("ddim", "dpmpp_2m"))
    np.testing.assert_allclose(dpm, ddim, rtol=1e-5, atol=1e-6)
    three = run("dpmpp_2m", 3, jax.random.key(0), x_T=x_T)  # second order from step 2 on
    assert not np.allclose(three, run("ddim", 3, jax.random.key(0), x_T=x_T), atol=1e-4)


@pytest.mark.parametrize("sampler", samplers.ODE)
def test_ode_samplers_call_the_network_as_often_as_they_should(sampler):
    calls = []

    def counting(x_t, t, ab):
        calls.append(None)  # traced once per call site, unrolled scans aside
        return gaussian_denoiser(0.5)(x_t, t, ab)

    x = jax.make_jaxpr(
        lambda x: samplers.sample_loop(
            counting, x, ALPHA_BAR, np.arange(6)[::-1], jax.random.key(0), sampler=sampler
        )
    )(jnp.zeros((2, 1)))
    # One call in the scan body (two for Heun) and one for the last step to sigma = 0.
    assert len(calls) == {"euler": 2, "heun": 3, "dpmpp_2m": 2}[sampler]
    assert "scan" in str(x)
