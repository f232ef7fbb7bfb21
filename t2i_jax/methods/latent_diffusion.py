"""Latent diffusion: the diffusion method over the latents of a trained, frozen VAE.

`ldm.autoencoder` names the workdir of a finished `vae` run with `vae.conditional=False`
(text enters through the UNet only, as in Stable Diffusion). When this run starts, that
run's latest EMA encoder and decoder become this run's frozen weights ("autoencoder"),
stored once in its frozen store (runs/frozen_store.py), never in its train state. The VAE
run's config.json is still read whenever the method is built (it gives the networks'
shapes, and it is checked before anything is written), so that folder must stay where
the config says.

Everything else is `Diffusion`: the same UNet, schedules, v/eps targets, caption dropout,
samplers and guidance, denoising latents z = latent_scale * E[q(z | x)] of shape
(image_size / 2^(levels-1))^2 x latent_channels instead of pixels. Samples are decoded by
the VAE's decoder (the likelihood's mean), then clipped to [-1, 1].
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import config as config_lib
from t2i_jax.checkpoint import read_latest_arrays
from t2i_jax.errors import ConfigError, UserError
from t2i_jax.methods.base import Frozen, shapes_of, train_setting
from t2i_jax.methods.diffusion import Diffusion
from t2i_jax.methods.microbatches import WHOLE, Rows
from t2i_jax.methods.vae import VAE
from t2i_jax.text.setup import TextSetup

AUTOENCODER = "autoencoder"  # its name in the frozen weights


def autoencoder_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The VAE run's config, checked to be a text-free VAE of this run's image size."""
    workdir = config.ldm.autoencoder
    if not workdir:
        raise ConfigError("ldm.autoencoder must name the workdir of a trained VAE run")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"ldm.autoencoder: no VAE run at {workdir} (no config.json); train one first "
            "(see experiments/ldm_shapes.py)"
        )
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
    return vae


def check_autoencoder(config: ml_collections.ConfigDict) -> None:
    """Before a run creates anything: the autoencoder run fits (`autoencoder_config`) and
    has a checkpoint to take its weights from."""
    autoencoder_config(config)
    checkpoints = os.path.join(config.ldm.autoencoder, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        raise ConfigError(f"ldm.autoencoder: no checkpoint in {checkpoints}")


class LatentDiffusion(Diffusion):
    """Diffusion on a frozen VAE's latents."""

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        check_autoencoder(config)

    def __init__(self, config: ml_collections.ConfigDict, text: TextSetup):
        # Only the VAE run's config: a run that has stored its frozen VAE, and a compile
        # check (train/preflight.py), need none of its checkpoints.
        vae_config = autoencoder_config(config)
        # The frozen VAE computes as this run does (it is never differentiated: no remat).
        vae_config.train.compute_dtype = train_setting(config, "compute_dtype")
        vae_config.train.remat = "none"
        vae_config.train.grad_accum_steps = 1
        # Text-free: the VAE reads no caption, so this run's text setup serves it.
        self.vae = VAE(vae_config, text)
        self.scale = config.ldm.latent_scale
        super().__init__(config, text)
        self.sample_shape = tuple(self.vae.latent_shape)

    def unet_fields(self) -> dict:
        return {**self.config.model.to_dict(), "out_channels": self.vae.latent_shape[-1]}

    def load_frozen(self) -> Frozen:
        """The VAE run's latest EMA encoder and decoder (host arrays), and a frozen text
        encoder's params if any."""
        workdir = self.config.ldm.autoencoder
        try:
            state = read_latest_arrays(f"{workdir}/checkpoints")
        except UserError as e:
            raise UserError(f"ldm.autoencoder: {e}") from None
        model = state["ema_params"]["model"]
        autoencoder = {"encoder": model["encoder"], "decoder": model["decoder"]}
        return {**super().load_frozen(), AUTOENCODER: autoencoder}

    def frozen_shapes(self) -> Frozen:
        """The autoencoder's shapes from the VAE's own init: no checkpoint is read."""
        size = self.config.data.image_size
        batch = {"image": jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)}
        batch["tokens"] = jax.ShapeDtypeStruct((1, self.text_setup.max_len), jnp.int32)
        batch["mask"] = jax.ShapeDtypeStruct((1, self.text_setup.max_len), jnp.bool_)
        state = jax.eval_shape(self.vae.init, jax.random.key(0), batch)
        model = nn.unbox(state.ema_params)["model"]
        autoencoder = {"encoder": model["encoder"], "decoder": model["decoder"]}
        return {**shapes_of(self.conditioner.load_frozen()), AUTOENCODER: autoencoder}

    def latents(self, autoencoder, image: jax.Array) -> jax.Array:
        """latent_scale * posterior mean of the frozen VAE, [B, h, w, c]."""
        mean, _ = self.vae.posterior(autoencoder, image, None)
        return self.scale * mean

    def decode(self, autoencoder, z: jax.Array) -> jax.Array:
        mean, _ = self.vae.decode(autoencoder, z / self.scale, None)
        return jnp.clip(mean, -1.0, 1.0)

    # -- Diffusion, on latents ------------------------------------------------------------
    def init_model(self, rng: jax.Array, batch: dict, frozen: Frozen | None) -> dict:
        latents = self.latents(frozen[AUTOENCODER], batch["image"])
        return super().init_model(rng, {**batch, "image": latents}, frozen)

    def loss_terms(
        self,
        params,
        batch: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        *,
        train: bool = True,
        rows: Rows = WHOLE,
    ):
        latents = self.latents(frozen[AUTOENCODER], batch["image"])
        batch = {**batch, "image": latents}
        return super().loss_terms(params, batch, rng, frozen, train=train, rows=rows)

    def finish(self, frozen: Frozen | None, x0: jax.Array) -> jax.Array:
        return self.decode(frozen[AUTOENCODER], x0)

    def reconstruct(self, params, batch: dict, frozen: Frozen | None = None) -> jax.Array:
        """The frozen VAE's reconstructions (what the latents can hold at best)."""
        autoencoder = frozen[AUTOENCODER]
        return self.decode(autoencoder, self.latents(autoencoder, batch["image"]))
