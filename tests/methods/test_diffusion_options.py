"""Diffusion's training options against their closed forms: zero-terminal-SNR rescaling,
the resolution shift of the schedule, Min-SNR-gamma weights, offset noise and input
perturbation (all off by default)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_diffusion import build_method, random_batch

from t2i_jax.errors import ConfigError
from t2i_jax.methods import samplers, schedules
from t2i_jax.methods.diffusion import Diffusion, training_noise
from t2i_jax.methods.microbatches import WHOLE, Rows


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_zero_terminal_snr_rescales_sqrt_alpha_bar_affinely_to_zero(name):
    plain = schedules.alphas_cumprod(name, 1000)
    rescaled = schedules.alphas_cumprod(name, 1000, zero_terminal_snr=True)
    assert rescaled[-1] == 0.0 and plain[-1] > 0.0  # SNR 0 at the last step
    np.testing.assert_allclose(rescaled[0], plain[0], rtol=1e-12)  # the first step kept
    assert np.all(np.diff(rescaled) < 0)
    # sqrt(ab') = (sqrt(ab) - sqrt(ab_T)) * sqrt(ab_0) / (sqrt(ab_0) - sqrt(ab_T)): affine.
    root, new = np.sqrt(plain), np.sqrt(rescaled)
    slope, intercept = np.polyfit(root, new, 1)
    np.testing.assert_allclose(slope * root + intercept, new, atol=1e-12)
    np.testing.assert_allclose(slope, root[0] / (root[0] - root[-1]), rtol=1e-10)


@pytest.mark.parametrize("shift", [0.5, 4.0])
def test_schedule_shift_divides_every_snr_by_its_square(shift):
    plain = schedules.alphas_cumprod("cosine", 1000)
    shifted = schedules.alphas_cumprod("cosine", 1000, shift=shift)
    snr = lambda ab: ab / (1.0 - ab)  # noqa: E731
    np.testing.assert_allclose(snr(shifted), snr(plain) / shift**2, rtol=1e-9)
    assert np.all(np.diff(shifted) < 0) and np.all((shifted > 0) & (shifted < 1))
    np.testing.assert_array_equal(schedules.alphas_cumprod("cosine", 1000, shift=1.0), plain)
    with pytest.raises(ConfigError, match="schedule_shift must be positive"):
        schedules.alphas_cumprod("cosine", 1000, shift=0.0)


def test_min_snr_weights_clip_the_x0_loss_at_gamma():
    ab = jnp.asarray([0.999, 0.9, 0.5, 0.1, 0.001])
    snr = np.asarray(ab / (1 - ab))
    clipped = np.minimum(snr, 5.0)
    eps = np.asarray(schedules.min_snr_weight(ab, 5.0, "eps"))
    v = np.asarray(schedules.min_snr_weight(ab, 5.0, "v"))
    # The eps loss is the x0 loss / SNR and the v loss the x0 loss / (SNR + 1): each weight
    # turns it into min(SNR, gamma) x the x0 loss.
    np.testing.assert_allclose(eps * snr, clipped, rtol=1e-6)
    np.testing.assert_allclose(v * (snr + 1), clipped, rtol=1e-6)
    np.testing.assert_allclose(eps[snr <= 5], 1.0, rtol=1e-6)  # below gamma: unweighted
    # ... and the x0 error really is sqrt(SNR) x the eps error at a step:
    a = float(ab[2])
    x_t, eps_hat, eps_true = 0.3, 0.7, 0.2
    x0_hat, x0_true = ((x_t - np.sqrt(1 - a) * e) / np.sqrt(a) for e in (eps_hat, eps_true))
    np.testing.assert_allclose((x0_hat - x0_true) ** 2, (eps_hat - eps_true) ** 2 / snr[2])


def test_without_options_the_training_noise_is_the_plain_draw():
    key = jax.random.key(0)
    noise, input_noise = training_noise(key, (4, 8, 8, 3), WHOLE, offset=0.0, perturbation=0.0)
    np.testing.assert_array_equal(noise, jax.random.normal(key, (4, 8, 8, 3)))
    assert input_noise is noise


def test_offset_noise_shifts_each_image_and_channel():
    """Var of an image's per-channel mean noise: 1 / (H W) without offset, + offset^2 with."""
    key, shape, offset = jax.random.key(1), (1000, 8, 8, 3), 0.5
    plain, _ = training_noise(key, shape, WHOLE, offset=0.0, perturbation=0.0)
    noise, input_noise = training_noise(key, shape, WHOLE, offset=offset, perturbation=0.0)
    assert input_noise is noise  # the target's noise is the input's
    shift = np.asarray(noise - plain) / offset
    np.testing.assert_allclose(shift, shift[:, :1, :1, :].repeat(8, 1).repeat(8, 2), atol=1e-5)
    means = np.asarray(noise).mean(axis=(1, 2))  # [1000, 3]
    # 3,000 draws: the variance's standard error is ~2.6%; 10% is ~4 of them.
    np.testing.assert_allclose(means.var(), offset**2 + 1 / 64, rtol=0.1)
    np.testing.assert_allclose(np.asarray(plain).mean(axis=(1, 2)).var(), 1 / 64, rtol=0.1)


def test_input_perturbation_noises_the_input_not_the_target():
    key, shape, gamma = jax.random.key(2), (64, 8, 8, 3), 0.3
    plain, _ = training_noise(key, shape, WHOLE, offset=0.0, perturbation=0.0)
    noise, input_noise = training_noise(key, shape, WHOLE, offset=0.0, perturbation=gamma)
    np.testing.assert_array_equal(noise, plain)  # the target's noise is unchanged
    extra = np.asarray(input_noise - noise)
    np.testing.assert_allclose(extra.var(), gamma**2, rtol=0.05)  # 12,288 draws: 1.3% s.e.
    np.testing.assert_allclose(np.asarray(input_noise).var(), 1 + gamma**2, rtol=0.05)
    assert abs(np.corrcoef(extra.ravel(), np.asarray(noise).ravel())[0, 1]) < 0.03


def test_the_noise_of_a_microbatch_is_its_rows_of_the_batchs():
    key, shape = jax.random.key(3), (8, 4, 4, 3)
    whole = training_noise(key, shape, WHOLE, offset=0.2, perturbation=0.1)
    for i in range(4):
        part = training_noise(key, (2, 4, 4, 3), Rows(i, 4), offset=0.2, perturbation=0.1)
        for a, b in zip(part, whole, strict=True):
            np.testing.assert_array_equal(a, b[i::4])


def test_the_options_reach_the_loss(test_config, tmp_path):
    """loss_terms with Min-SNR-gamma is the plain loss times the weight of each example's
    timestep (drawn from the same key); input perturbation changes the loss."""
    test_config.diffusion.prediction = "eps"
    batch = random_batch(test_config)
    method = build_method(test_config, tmp_path)
    params = jax.jit(method.init)(jax.random.key(0), batch).params["model"]
    # Perturb the zero-initialised output layer so the loss depends on the network's input.
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    rng = jax.random.key(5)
    plain = np.asarray(jax.jit(method.loss_terms)(params, batch, rng))

    test_config.diffusion.min_snr_gamma = 5.0
    weighted_method = build_method(test_config, tmp_path)
    weighted = np.asarray(jax.jit(weighted_method.loss_terms)(params, batch, rng))
    t = jax.random.randint(jax.random.split(rng, 4)[0], (len(plain),), 0, 1000)
    weights = np.asarray(schedules.min_snr_weight(method.alpha_bar[t], 5.0, "eps"))
    assert weights.min() < 0.99  # some step above SNR 5, so the test can fail
    np.testing.assert_allclose(weighted, plain * weights, rtol=1e-5)

    test_config.diffusion.min_snr_gamma = 0.0
    test_config.diffusion.input_perturbation = 0.1
    perturbed = jax.jit(build_method(test_config, tmp_path).loss_terms)(params, batch, rng)
    assert not np.allclose(np.asarray(perturbed), plain, rtol=1e-3)


def test_zero_terminal_snr_needs_v_prediction(test_config):
    test_config.diffusion.zero_terminal_snr = True
    test_config.diffusion.prediction = "eps"
    with pytest.raises(ConfigError, match="zero_terminal_snr needs diffusion.prediction=v"):
        Diffusion.check_config(test_config)
    test_config.diffusion.prediction = "v"
    Diffusion.check_config(test_config)
    test_config.diffusion.offset_noise = -0.1
    with pytest.raises(ConfigError, match="offset_noise must be >= 0"):
        Diffusion.check_config(test_config)


def test_position_options_are_checked(test_config):
    test_config.model.position_embedding = "rope"
    with pytest.raises(ConfigError, match="unknown model.position_embedding 'rope'"):
        Diffusion.check_config(test_config)
    test_config.model.position_embedding = "sincos"
    Diffusion.check_config(test_config)  # widths 16 and 32
    test_config.model.base_channels = 6
    with pytest.raises(ConfigError, match=r"width divisible by 4 .*\[6, 12\]"):
        Diffusion.check_config(test_config)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "heun"])
def test_samplers_reach_the_data_from_a_zero_terminal_snr_start(sampler):
    """With SNR 0 at T, x_T ~ N(0, I) is exactly the chain's last marginal; every sampler
    (the ODE ones from ab = 2^-24) reaches data N(0.3, 0.5^2) with the exact denoiser."""
    from test_samplers import gaussian_denoiser

    alpha_bar = jnp.asarray(schedules.alphas_cumprod("cosine", 1000, True), jnp.float32)
    x_T = jax.random.normal(jax.random.key(7), (20_000, 1))
    x = samplers.sample_loop(gaussian_denoiser(0.5, 0.3), x_T, alpha_bar,
                             samplers.sampling_timesteps(1000, 100), jax.random.key(3),
                             sampler=sampler, clip_denoised=False)  # fmt: skip
    assert np.all(np.isfinite(np.asarray(x)))
    # 20,000 draws: standard errors 0.0035 (mean), 0.0025 (std); bias of 100 steps below.
    assert abs(float(x.mean()) - 0.3) < 0.02 and abs(float(x.std()) - 0.5) < 0.02
