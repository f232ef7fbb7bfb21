"""The conditional VAE: its ELBO terms, training, validation numbers, sampling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import build_method, real_batch

from t2i_jax import config as config_lib
from t2i_jax.errors import ConfigError
from t2i_jax.methods import registry, vae_losses

VAE_EXPERIMENT = "experiments/vae_shapes.py"


def build_vae(data_dir, tmp_path, **overrides):
    return build_method(VAE_EXPERIMENT, data_dir, tmp_path, **overrides)


@pytest.mark.parametrize("likelihood", ["logistic", "gaussian"])
def test_training_lowers_the_negative_elbo_on_a_fixed_batch(data_dir, tmp_path, likelihood):
    config, builder, method, fns = build_vae(
        data_dir, tmp_path, **{"vae.likelihood": likelihood, "optim.lr": 2e-3}
    )
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    history = []
    for step in range(40):
        state, metrics = fns.train_step(state, batch, jax.random.key(step))
        history.append({k: float(v) for k, v in metrics.items()})
    first, last = history[0], history[-1]
    assert all(np.isfinite(v) for m in history for v in m.values())
    assert last["nelbo"] < 0.8 * first["nelbo"]
    # The logged terms are the unweighted ELBO's: nelbo = recon + kl.
    assert last["nelbo"] == pytest.approx(last["recon"] + last["kl"], rel=1e-5)
    if likelihood == "logistic":
        dims = 32 * 32 * 3
        assert last["bits_per_dim"] == pytest.approx(last["nelbo"] / (dims * math.log(2)), 1e-5)
    else:
        assert "bits_per_dim" not in last  # a density: no bits/dim


def test_learned_prior_starts_as_the_standard_normal(data_dir, tmp_path):
    """Zero-init output: at step 0 the learned prior's KL is the closed form against N(0, I)."""
    config, builder, method, fns = build_vae(data_dir, tmp_path)
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    model = state.params["model"]
    terms = method.loss_terms(model, batch, jax.random.key(1))
    t = method._text_vector(model, batch)
    mean_q, logvar_q = method.posterior(model, batch["image"], t)
    closed = 0.5 * (jnp.exp(logvar_q) + mean_q**2 - 1.0 - logvar_q)
    np.testing.assert_allclose(np.asarray(terms["kl"]), np.asarray(closed), rtol=1e-5, atol=1e-6)


def test_validation_metrics_count_active_units_and_convert_to_bits(data_dir, tmp_path):
    config, _, method, _ = build_vae(data_dir, tmp_path)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(500, 6)) * np.array([1.0, 0.5, 0.2, 0.05, 0.01, 0.0])
    totals = {
        "count": np.float64(500),
        "recon": np.float64(500 * 2000.0),
        "kl": np.float64(500 * 100.0),
        "mean_sum": means.sum(0),
        "mean_sq_sum": (means**2).sum(0),
    }
    metrics = method.validation_metrics(totals)
    expected_units = int(np.sum(np.var(means, axis=0) > 0.01))
    assert expected_units == 3 and metrics["active_units"] == expected_units
    assert metrics["nelbo"] == pytest.approx(2100.0)
    bits = float(vae_losses.bits_per_dim(2100.0, 32 * 32 * 3))
    assert metrics["bits_per_dim"] == pytest.approx(bits)


def test_validation_stats_sum_over_the_batch(data_dir, tmp_path):
    config, builder, method, fns = build_vae(data_dir, tmp_path)
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method, "validation")
    key = jax.random.key(3)
    stats = method.validation_stats(state.params, batch, key)
    terms = method.loss_terms(state.params["model"], batch, key)
    assert float(stats["count"]) == config.train.batch_size
    np.testing.assert_allclose(float(stats["recon"]), float(jnp.sum(terms["recon"])), rtol=1e-6)
    np.testing.assert_allclose(float(stats["kl"]), float(jnp.sum(terms["kl"])), rtol=1e-5)
    assert stats["mean_sum"].shape == (8 * 8 * 4,)  # 32 px, 3 levels: an 8x8x4 latent


def test_samples_are_deterministic_follow_the_text_and_decode_the_prior_mean_when_cold(
    data_dir, tmp_path
):
    config, builder, method, fns = build_vae(data_dir, tmp_path)
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    # Train briefly so the decoder reads the text (at init its text projection is random).
    for step in range(3):
        state, _ = fns.train_step(state, batch, jax.random.key(step))
    params = jax.device_get(state.ema_params)
    # The prior's output layer starts at 0: move it so its mean is not the N(0, I) one.
    params["model"]["prior"] = jax.tree.map(
        lambda p: p + 0.3 * np.sin(np.arange(p.size).reshape(p.shape)), params["model"]["prior"]
    )
    text = {"tokens": batch["tokens"][:4], "mask": batch["mask"][:4]}
    sample = jax.jit(method.sample)
    a = np.asarray(sample(params, text, jax.random.key(5)))
    b = np.asarray(sample(params, text, jax.random.key(5)))
    c = np.asarray(sample(params, text, jax.random.key(6)))
    assert a.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    other = {"tokens": jnp.roll(text["tokens"], 1, axis=0), "mask": jnp.roll(text["mask"], 1, 0)}
    assert not np.array_equal(a, np.asarray(sample(params, other, jax.random.key(5))))

    cold = jax.jit(lambda p, t, k: method.sample(p, t, k, temperature=0.0))
    cold_a = np.asarray(cold(params, text, jax.random.key(5)))
    # Temperature 0 decodes the prior mean: the key no longer matters...
    np.testing.assert_array_equal(cold_a, np.asarray(cold(params, text, jax.random.key(6))))
    # ...and the image is the decoder's mean at the learned prior's mean, from the networks.
    model = params["model"]
    encoder = method.conditioner.params(model, None)
    t = method.conditioner.encode(encoder, text["tokens"], text["mask"]).pooled
    mean_p, _ = method.prior.apply({"params": model["prior"]}, t)
    assert float(jnp.max(jnp.abs(mean_p))) > 0.1  # not the standard normal's mean
    decoded, _ = method.decode(model, mean_p, t)
    np.testing.assert_allclose(cold_a, np.clip(np.asarray(decoded), -1.0, 1.0), atol=1e-5)
    at_zero, _ = method.decode(model, jnp.zeros_like(mean_p), t)
    assert np.max(np.abs(cold_a - np.clip(np.asarray(at_zero), -1.0, 1.0))) > 1e-3
    recon = jax.jit(method.reconstruct)(params, batch)
    assert recon.shape == batch["image"].shape


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vae.likelihood": "bernoulli"}, "unknown vae.likelihood 'bernoulli'"),
        ({"vae.prior": "vamp"}, "unknown vae.prior 'vamp'"),
        ({"vae.channel_mults": (1, 2, 2, 2, 2, 2, 2)}, "not divisible by 64"),
        ({"vae.gaussian_sigma": 0.0}, "vae.gaussian_sigma must be positive"),
    ],
)
def test_bad_vae_sections_are_config_errors(overrides, message):
    config = config_lib.load_config(f"{VAE_EXPERIMENT}:test")
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    with pytest.raises(ConfigError, match=message):
        registry.check_names(config)
