"""Latent diffusion: the diffusion method over the latents of a trained, frozen VAE.

`ldm.autoencoder` names the workdir of a finished `vae` run with `vae.conditional=False`
(text enters through the UNet only, as in Stable Diffusion). Its latest checkpoint's EMA
encoder and decoder are stored in this run's params under "autoencoder" when the run
starts, frozen by the optimizer mask. The VAE run's directory is still read whenever the
method is built (train, resume, sample, eval: its config.json gives the networks' shapes,
and it is checked before anything is written), so it must stay where the config says.

Everything else is `Diffusion`: the same UNet, schedules, v/eps targets, caption dropout,
samplers and guidance, denoising latents z = latent_scale * E[q(z | x)] of shape
(image_size / 2^(levels-1))^2 x latent_channels instead of pixels. Samples are decoded by
the VAE's decoder (the likelihood's mean), then clipped to [-1, 1].
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax.errors import ConfigError, UserError
from t2i_jax.methods.diffusion import Diffusion
from t2i_jax.text.assets import TextSide
from t2i_jax.train import sharding

AUTOENCODER_PATTERN = "autoencoder/.*"


def check_config(config: ml_collections.ConfigDict) -> None:
    """Before a run creates anything: the autoencoder run exists, has a checkpoint, and is a
    text-free VAE of this run's image size."""
    from t2i_jax import config as config_lib

    workdir = config.ldm.autoencoder
    if not workdir:
        raise ConfigError("ldm.autoencoder must name the workdir of a trained VAE run")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"ldm.autoencoder: no VAE run at {workdir} (no config.json); train one first "
            "(see experiments/ldm_shapes.py)"
        )
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        raise ConfigError(f"ldm.autoencoder: no checkpoint in {checkpoints}")
    with open(path) as f:
        vae = config_lib.from_json(f.read())
    if vae.method != "vae":
        raise ConfigError(f"ldm.autoencoder {workdir} is a {vae.method} run, not a vae run")
    if vae.vae.conditional:
        raise ConfigError(
            f"ldm.autoencoder {workdir} reads captions (vae.conditional=True); latent "
            "diffusion needs a text-free autoencoder: train it with --config.vae.conditional"
            "=False --config.vae.prior=standard"
        )
    if vae.data.image_size != config.data.image_size:
        raise ConfigError(
            f"ldm.autoencoder was trained on {vae.data.image_size}px images, this run has "
            f"data.image_size={config.data.image_size}"
        )
    if config.diffusion.clip_denoised:
        raise ConfigError("diffusion.clip_denoised must be False: latents are not in [-1, 1]")
    if not config.ldm.latent_scale > 0:
        raise ConfigError(f"ldm.latent_scale must be positive, got {config.ldm.latent_scale}")


def load_autoencoder(workdir: str):
    """(VAE method, EMA params {"encoder", "decoder"} on the host) of a finished VAE run."""
    from t2i_jax.eval.sample import load_run

    try:
        _, _, method, state = load_run(workdir)
    except UserError as e:
        raise UserError(f"ldm.autoencoder: {e}") from None
    model = sharding.to_host(state.ema_params["model"])  # also across processes
    return method, {"encoder": model["encoder"], "decoder": model["decoder"]}


class LatentDiffusion(Diffusion):
    """Diffusion on a frozen VAE's latents, behind the `Method` protocol."""

    def __init__(self, config: ml_collections.ConfigDict, text: TextSide):
        check_config(config)
        # Host copies: `init` places them with the rest of the state.
        self.vae, self.vae_params = load_autoencoder(config.ldm.autoencoder)
        self.scale = config.ldm.latent_scale
        super().__init__(config, text)
        self.sample_shape = tuple(self.vae.latent_shape)

    def unet_fields(self) -> dict:
        return {**self.config.model.to_dict(), "out_channels": self.vae.latent_shape[-1]}

    def frozen_patterns(self) -> list[str]:
        return [AUTOENCODER_PATTERN]

    def latents(self, autoencoder, image: jax.Array) -> jax.Array:
        """latent_scale * posterior mean of the frozen VAE, [B, h, w, c]."""
        autoencoder = jax.lax.stop_gradient(autoencoder)
        mean, _ = self.vae.posterior(autoencoder, image, None)
        return self.scale * mean

    def decode(self, autoencoder, z: jax.Array) -> jax.Array:
        mean, _ = self.vae.decode(autoencoder, z / self.scale, None)
        return jnp.clip(mean, -1.0, 1.0)

    # -- Diffusion, on latents ------------------------------------------------------------
    def init_model(self, rng: jax.Array, batch: dict) -> dict:
        autoencoder = jax.tree.map(jnp.asarray, self.vae_params)
        latents = self.latents(autoencoder, batch["image"])
        model = super().init_model(rng, {**batch, "image": latents})
        return {**model, "autoencoder": autoencoder}

    def loss_terms(self, params, batch: dict, rng: jax.Array, *, train: bool = True):
        latents = self.latents(params["autoencoder"], batch["image"])
        return super().loss_terms(params, {**batch, "image": latents}, rng, train=train)

    def finish(self, model, x0: jax.Array) -> jax.Array:
        return self.decode(model["autoencoder"], x0)

    def reconstruct(self, params, batch: dict) -> jax.Array:
        """The frozen VAE's reconstructions (what the latents can hold at best)."""
        autoencoder = params["model"]["autoencoder"]
        return self.decode(autoencoder, self.latents(autoencoder, batch["image"]))
