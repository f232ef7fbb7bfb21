"""Latent diffusion's latents: ldm.latent_scale times the frozen VAE's posterior mean,
computed here by calling the VAE run's own encoder and decoder."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, real_batch, untrained_vae_run

from t2i_jax import config as config_lib
from t2i_jax.data import sources
from t2i_jax.methods import registry
from t2i_jax.methods.diffusion import Diffusion
from t2i_jax.runs.loading import load_run
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext

SCALES = (0.7, 1.4)  # the second is twice the first


@pytest.fixture(scope="module")
def vae_run(data_dir, tmp_path_factory) -> str:
    """A text-free VAE run for latent diffusion to read (untrained: the relations tested
    hold for any weights)."""
    return untrained_vae_run(data_dir, tmp_path_factory.mktemp("ldm_vae"))


@pytest.fixture(scope="module")
def ldms(vae_run, data_dir, tmp_path_factory):
    """{scale: (config, builder, method)} of the LDM `test` variant on that VAE."""
    built = {}
    for scale in SCALES:
        workdir = str(tmp_path_factory.mktemp(f"ldm_{scale}"))
        config = config_lib.load_config(os.path.join(REPO, "experiments", "ldm_shapes.py:test"))
        config.data.dir = data_dir
        config.ldm.update(autoencoder=vae_run, latent_scale=scale)
        builder = sources.prepare(config.data.name, config.data.dir, config.data.variant)
        text = build_text(config, TextContext(workdir, builder, config.seed))
        built[scale] = (config, builder, registry.build_method(config, text))
    return built


def test_latents_are_the_scaled_posterior_mean_and_decoding_undoes_the_scale(vae_run, ldms):
    vae_loaded = load_run(vae_run)
    vae, vae_model = vae_loaded.method, jax.device_get(vae_loaded.state.ema_params["model"])
    config, builder, method = ldms[SCALES[0]]
    batch = real_batch(config, builder, method)
    image = batch["image"]
    # The VAE's posterior mean E[q(z | x)] and its decoder's mean at it, from its networks.
    h = vae.encoder.apply({"params": vae_model["encoder"]}, image, None)
    mean = np.asarray(jnp.split(h, 2, axis=-1)[0])
    assert mean.shape == (8, 8, 8, 4) and np.std(mean) > 1e-3
    decoded, _ = vae.decode(vae_model, jnp.asarray(mean), None)
    vae_image = np.clip(np.asarray(decoded), -1.0, 1.0)

    # The frozen autoencoder is the VAE run's EMA encoder and decoder, as they are.
    frozen = jax.tree.map(jnp.asarray, method.load_frozen())
    autoencoder = frozen["autoencoder"]
    for part in ("encoder", "decoder"):
        pairs = zip(
            jax.tree.leaves(autoencoder[part]), jax.tree.leaves(vae_model[part]), strict=True
        )
        for a, b in pairs:
            np.testing.assert_array_equal(a, b)
    state = jax.jit(method.init)(jax.random.key(0), batch, frozen)

    latents, images = {}, {}
    for scale, (_, _, ldm) in ldms.items():
        latents[scale] = np.asarray(jax.jit(ldm.latents)(autoencoder, image))
        np.testing.assert_allclose(latents[scale], scale * mean, rtol=1e-5, atol=1e-6)
        # Decoding divides the scale out again: z / scale is the VAE's latent.
        images[scale] = np.asarray(jax.jit(ldm.decode)(autoencoder, latents[scale]))
        np.testing.assert_allclose(images[scale], vae_image, atol=1e-5)
        recon = np.asarray(jax.jit(ldm.reconstruct)(state.params, batch, frozen))
        np.testing.assert_allclose(recon, vae_image, atol=1e-5)
        if scale != SCALES[-1]:
            continue
        # The denoising loss is diffusion's on those latents (one scale: two UNet compiles).
        key = jax.random.key(3)
        got = jax.jit(ldm.loss_terms)(state.params["model"], batch, key, frozen)
        on_latents = jax.jit(lambda p, b, k, f, ldm=ldm: Diffusion.loss_terms(ldm, p, b, k, f))(
            state.params["model"], {**batch, "image": jnp.asarray(scale * mean)}, key, frozen
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(on_latents), rtol=1e-5)
    small, large = SCALES
    np.testing.assert_allclose(latents[large], 2 * latents[small], rtol=1e-6)
    np.testing.assert_allclose(images[large], images[small], atol=1e-6)


def test_frozen_shapes_are_the_loaded_weights_shapes_without_reading_them(vae_run, ldms, tmp_path):
    """`frozen_shapes` (what a compile without weights uses) comes from the VAE's config
    alone, and equals the shapes and dtypes of the weights `load_frozen` reads."""
    method = ldms[SCALES[0]][2]
    spec = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)
    assert spec(method.frozen_shapes()) == spec(method.load_frozen())
    # The VAE run's config alone is enough to build the method and get them.
    config_only = tmp_path / "vae_config_only"
    config_only.mkdir()
    shutil.copy(os.path.join(vae_run, "config.json"), config_only / "config.json")
    config = ldms[SCALES[0]][0].copy_and_resolve_references()
    config.ldm.autoencoder = str(config_only)
    rebuilt = registry.build_method(config, method.text_setup)
    assert spec(rebuilt.frozen_shapes()) == spec(method.load_frozen())
