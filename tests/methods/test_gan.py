"""GAN objectives against closed forms, the players' steps, R1 against finite differences,
modulated convolution against explicit per-sample kernels, truncation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import build_method, real_batch

from t2i_jax import config as config_lib
from t2i_jax.errors import ConfigError, UserError
from t2i_jax.methods import gan_losses as losses
from t2i_jax.methods import registry
from t2i_jax.nets.dfgan import DFDiscriminator
from t2i_jax.nets.stylegan2 import modulated_conv

GAN_EXPERIMENT = "experiments/gan_shapes.py"
LOGITS = np.array([-100.0, -30.0, -3.0, -0.5, 0.0, 0.5, 3.0, 30.0, 100.0])


def log_sigmoid(x):
    """log(1 / (1 + e^-x)) in float64, stable for any x."""
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_losses_equal_their_closed_forms_and_stay_finite(objective):
    x = jnp.asarray(LOGITS, jnp.float32)
    d_real, d_fake, g = (
        np.asarray(f(objective, x), np.float64)
        for f in (losses.d_real_loss, losses.d_fake_loss, losses.g_loss)
    )
    for value in (d_real, d_fake, g):
        assert np.isfinite(value).all()
    if objective == "hinge":
        expected = (np.maximum(0, 1 - LOGITS), np.maximum(0, 1 + LOGITS), -LOGITS)
    else:  # -log D(x), -log(1 - D(G(z))), and G's log(1 - D) or -log D
        g_expected = log_sigmoid(-LOGITS) if objective == "minimax" else -log_sigmoid(LOGITS)
        expected = (-log_sigmoid(LOGITS), -log_sigmoid(-LOGITS), g_expected)
    for got, want in zip((d_real, d_fake, g), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Gradients are finite too (a probability-space formula gives NaN at |logit| = 100).
    for f in (losses.d_real_loss, losses.d_fake_loss, losses.g_loss):
        grad = jax.grad(lambda v, f=f: jnp.sum(f(objective, v)))(x)
        assert np.isfinite(np.asarray(grad)).all()


def test_minimax_generator_saturates_and_non_saturating_does_not():
    """At a confident D (logit -10 on fakes), log(1 - D) has a vanishing gradient."""
    fake = jnp.asarray([-10.0])
    minimax = jax.grad(lambda v: losses.g_loss("minimax", v).sum())(fake)
    non_sat = jax.grad(lambda v: losses.g_loss("non_saturating", v).sum())(fake)
    assert abs(float(minimax[0])) < 1e-4 and abs(float(non_sat[0])) > 0.99


def test_r1_equals_finite_differences():
    with jax.enable_x64(True):
        disc = DFDiscriminator(image_size=8, channels=4, channel_mults=(1, 2), dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float64)
        text = jax.random.normal(jax.random.key(1), (2, 5), jnp.float64)
        params = jax.tree.map(
            lambda p: jnp.asarray(p, jnp.float64) + 0.1, disc.init(jax.random.key(2), x, text)
        )
        d = jax.jit(lambda v: disc.apply(params, v, text))
        penalty = np.asarray(losses.r1_penalty(d, x))
        eps = 1e-5
        flat = np.asarray(x).reshape(2, -1)
        grads = np.zeros_like(flat)
        for i in range(flat.shape[1]):
            step = np.zeros_like(flat)
            step[:, i] = eps
            plus = np.asarray(d(jnp.asarray((flat + step).reshape(x.shape))))
            minus = np.asarray(d(jnp.asarray((flat - step).reshape(x.shape))))
            grads[:, i] = (plus - minus) / (2 * eps)  # each example's logit moves alone
    np.testing.assert_allclose(penalty, 0.5 * np.sum(grads**2, axis=1), rtol=1e-6)
    assert (penalty > 0).all()


def test_modulated_conv_equals_per_sample_kernels():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (3, 6, 6, 4))
    kernel = jax.random.normal(k[1], (3, 3, 4, 5))
    styles = jax.random.uniform(k[2], (3, 4), minval=0.2, maxval=2.0)
    for demodulate in (False, True):
        got = modulated_conv(x, kernel, styles, demodulate=demodulate)
        for b in range(3):
            w = kernel * styles[b][None, None, :, None]
            if demodulate:
                w = w / jnp.sqrt(jnp.sum(w**2, axis=(0, 1, 2), keepdims=True) + 1e-8)
            ref = jax.lax.conv_general_dilated(
                x[b : b + 1], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            np.testing.assert_allclose(got[b : b + 1], ref, rtol=1e-5, atol=1e-5)


def build_gan(data_dir, tmp_path, **overrides):
    return build_method(GAN_EXPERIMENT, data_dir, tmp_path, **overrides)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_each_players_step_moves_its_objective(data_dir, tmp_path, objective):
    # MA-GP off: the objective alone decides the steps (and the compile is quicker).
    overrides = {"gan.objective": objective, "gan.ma_gp_weight": 0.0}
    config, builder, method, fns = build_gan(data_dir, tmp_path, **overrides)
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    z_key = jax.random.key(7)
    z = method._z(z_key, config.train.batch_size)
    noise = jax.random.key(8)

    def logits(params):
        g, d = params["generator"], params["discriminator"]
        t = method._text_vector(g, batch)
        fake = method._generate(g, z, t, noise, train=True)
        return method._discriminate(d, batch["image"], t), method._discriminate(d, fake, t)

    before = jax.device_get(state.params)  # The step donates the state's buffers.
    real0, fake0 = logits(before)
    new_state, metrics = fns.train_step(state, batch, jax.random.key(1))
    # The D step alone (new D, old G) widens the gap between real and fake logits.
    real1, fake1 = logits({**before, "discriminator": new_state.params["discriminator"]})
    assert float(jnp.mean(real1 - fake1)) > float(jnp.mean(real0 - fake0))
    # The G step (new G against the new D) raises D's logits of G's samples.
    _, fake2 = logits(new_state.params)
    assert float(jnp.mean(fake2)) > float(jnp.mean(fake1))
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_stylegan2_truncation_pulls_samples_to_each_captions_centre(data_dir, tmp_path):
    overrides = {"gan.network": "stylegan2", "gan.conditioning": "projection"}
    config, builder, method, fns = build_gan(data_dir, tmp_path, **overrides)
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    assert not np.array_equal(batch["tokens"][0], batch["tokens"][1])
    rows = jnp.array([0, 0, 0, 1, 1, 1])  # two different captions, three draws each
    text = {"tokens": batch["tokens"][rows], "mask": batch["mask"][rows]}
    params = state.ema_params
    sample = jax.jit(lambda p, t, k, psi: method.sample(p, t, k, truncation=psi), static_argnums=3)
    key = jax.random.key(3)
    psis = (1.0, 0.5, 0.0)
    images = {psi: np.asarray(sample(params, text, key, psi)) for psi in psis}
    free, centre = images[1.0], images[0.0]
    assert free.shape == (6, 32, 32, 3)

    # psi = 0: every draw of z gives its caption's centre image (noise strengths start at
    # 0, so the image is a function of w alone); the two captions' centres differ.
    for i in (0, 3):
        for j in (1, 2):
            np.testing.assert_allclose(centre[i + j], centre[i], atol=1e-6)
    assert np.max(np.abs(centre[0] - centre[3])) > 0.05
    for i in (0, 3):  # untruncated draws of one caption differ
        assert np.max(np.abs(free[i] - free[i + 1])) > 1e-3
    # psi -> 0 moves every sample monotonically towards its caption's centre image.
    distance = {psi: np.sqrt(np.sum((images[psi] - centre) ** 2, axis=(1, 2, 3))) for psi in psis}
    for hi, lo in zip(psis, psis[1:], strict=False):
        assert np.all(distance[lo] < distance[hi]), (hi, lo, distance[hi], distance[lo])

    # psi -> 1 through the truncated path (mapping, centre, synthesis) gives the untruncated
    # sample: the same z, noise and generator.
    near_one = np.asarray(sample(params, text, key, 1.0 - 1e-6))
    np.testing.assert_allclose(near_one, free, atol=1e-4)

    # The centre is the caption's mean w: against an independent estimate from 4096 draws
    # of z, the psi = 0 image (a mean over 64 draws) is much closer to the image of the mean
    # than the untruncated samples are.
    g = params["generator"]
    encoder = method.conditioner.params(g, None)
    t = method.conditioner.encode(encoder, text["tokens"], text["mask"]).pooled
    net = {"params": g["net"]}
    z = jax.random.normal(jax.random.key(11), (4096, config.gan.z_dim))
    ratios = []
    for i in (0, 3):
        w = method.generator.apply(net, z, jnp.repeat(t[i : i + 1], 4096, 0), method="mapping")
        mean_w = jnp.mean(w, axis=0, keepdims=True)
        image = method.generator.apply(net, mean_w, False, method="synthesis")
        image = np.asarray(jnp.clip(image, -1.0, 1.0))[0]
        to_mean = lambda x, image=image: np.sqrt(np.sum((x - image) ** 2))
        for j in range(3):
            ratios.append(to_mean(centre[i + j]) / to_mean(free[i + j]))
    assert max(ratios) < 0.5 and np.mean(ratios) < 0.3, ratios

    # gan.truncation is the default psi of `sample`.
    (tmp_path / "psi").mkdir()
    psi_overrides = {**overrides, "gan.truncation": 0.5}
    _, _, truncated, _ = build_gan(data_dir, tmp_path / "psi", **psi_overrides)
    default = jax.jit(truncated.sample)(params, text, key)
    np.testing.assert_allclose(np.asarray(default), images[0.5], atol=1e-6)

    new_state, metrics = fns.train_step(state, batch, jax.random.key(1))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    (tmp_path / "df").mkdir()
    _, _, dfgan, dfgan_fns = build_gan(data_dir, tmp_path / "df")
    with pytest.raises(UserError, match="mapping network"):
        dfgan.sample(dfgan_fns.init(jax.random.key(0)).ema_params, text, jax.random.key(0),
                     truncation=0.5)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"gan.objective": "wasserstein"}, "unknown gan.objective"),
        ({"gan.conditioning": "film"}, "unknown gan.conditioning"),
        ({"gan.g_channel_mults": (4, 2, 1)}, "gan.g_channel_mults needs 4 entries"),
        ({"gan.truncation": 0.7}, "gan.truncation needs gan.network=stylegan2"),
        ({"gan.n_critic": 0}, "gan.n_critic must be a positive int"),
    ],
)
def test_bad_gan_sections_are_config_errors(overrides, message):
    config = config_lib.load_config(f"{GAN_EXPERIMENT}:test")
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    with pytest.raises(ConfigError, match=message):
        registry.check_names(config)
