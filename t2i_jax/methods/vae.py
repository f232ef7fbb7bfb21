"""Text-conditional VAE trained on the ELBO.

  log p(x | t) >= E_q[log p(x | z, t)] - KL(q(z | x, t) || p(z | t))

Networks ("model"): the text encoder, a conv encoder q(z | x, t) giving a diagonal Gaussian
over a spatial latent (S/2^(n-1) squared x `latent_channels`), a conv decoder p(x | z, t),
and, with `vae.prior = "learned"`, a prior p(z | t) from the pooled text (else N(0, I)).
All three read the caption's pooled vector; with `vae.conditional=False` none does (an
autoencoder for latent diffusion) and the prior is N(0, I).

Likelihoods (`vae_losses`): "logistic" is the discretised logistic with a per-pixel scale
(a probability, so the negative ELBO converts to bits/dim); "gaussian" has a fixed sigma
(`vae.gaussian_sigma`, the familiar MSE VAE; a density, reported in nats).

Training objective per example: recon + w_t * KL', where w_t is beta ramped over
`kl_warmup_steps` and KL' holds each latent dimension at no less than `free_bits` nats.
Logged: the ELBO's terms unweighted (recon, kl, nelbo in nats per image) and the train
batch's bits/dim; on validation (`validation_stats`, run by the loop every
`train.eval_every` steps) bits/dim and the active units (Burda et al. 2016: latent
dimensions whose posterior mean varies across images, Cov_x(E_q[z_d]) > 0.01).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from t2i_jax.errors import ConfigError
from t2i_jax.methods import vae_losses as losses
from t2i_jax.methods.base import TrainState, ema_update
from t2i_jax.methods.text_conditioning import TextConditioner
from t2i_jax.nets.autoencoder import Decoder, Encoder, LatentPrior
from t2i_jax.text.assets import TextSide
from t2i_jax.train.optim import make_optimizer

PRIORS = ("learned", "standard")
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.'s threshold on Cov_x(E_q[z_d])


def check_config(config: ml_collections.ConfigDict) -> None:
    vc = config.vae
    if vc.likelihood not in losses.LIKELIHOODS:
        raise ConfigError(f"unknown vae.likelihood '{vc.likelihood}'; choose {losses.LIKELIHOODS}")
    if vc.prior not in PRIORS:
        raise ConfigError(f"unknown vae.prior '{vc.prior}'; choose {PRIORS}")
    downsample = 2 ** (len(vc.channel_mults) - 1)
    if config.data.image_size % downsample:
        raise ConfigError(
            f"data.image_size={config.data.image_size} is not divisible by {downsample} "
            f"({len(vc.channel_mults)} levels in vae.channel_mults)"
        )
    if not vc.conditional and vc.prior != "standard":
        raise ConfigError(
            "vae.conditional=False needs vae.prior=standard (a learned prior reads the text)"
        )
    if vc.gaussian_sigma <= 0:
        raise ConfigError(f"vae.gaussian_sigma must be positive, got {vc.gaussian_sigma}")


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    vc = config.vae
    side = config.data.image_size // 2 ** (len(vc.channel_mults) - 1)
    return (side, side, vc.latent_channels)


class VAE:
    """The conditional VAE behind the `Method` protocol."""

    def __init__(self, config: ml_collections.ConfigDict, text: TextSide):
        check_config(config)
        self.config = config
        self.vc = vc = config.vae
        # Plotted and shown by the loop; validation's bits/dim needs the logistic.
        val = "val_bits_per_dim" if vc.likelihood == "logistic" else "val_nelbo"
        self.curves = ("loss", "recon", "kl", val)
        self.text = TextConditioner(text)
        self.latent_shape = latent_shape(config)
        net = dict(channels=vc.channels, channel_mults=tuple(vc.channel_mults))
        net.update(num_res_blocks=vc.num_res_blocks)
        self.encoder = Encoder(**net, out_channels=2 * vc.latent_channels)
        out = 6 if vc.likelihood == "logistic" else 3  # (mean, log-scale) or the mean
        self.decoder = Decoder(**net, out_channels=out)
        self.prior = LatentPrior(self.latent_shape, vc.prior_hidden)
        # An unconditional VAE has no text encoder params to freeze.
        frozen = self.text.frozen_patterns if vc.conditional else []
        self.optimizer = make_optimizer(config.optim, config.train.steps, frozen=frozen)

    # -- networks ------------------------------------------------------------------------
    def _text_vector(self, model, batch, *, train=False, rng=None) -> jax.Array | None:
        """The caption's pooled vector; None for an unconditional VAE (vae.conditional)."""
        if not self.vc.conditional:
            return None
        return self.text.features(model["text_encoder"], batch, train=train, rng=rng).pooled

    def posterior(self, model, image, t) -> tuple[jax.Array, jax.Array]:
        """q(z | x, t): (mean, logvar), each [B, *latent_shape]."""
        h = self.encoder.apply({"params": model["encoder"]}, image, t)
        return jnp.split(h, 2, axis=-1)

    def prior_params(self, model, t, batch_size: int) -> tuple[jax.Array, jax.Array]:
        if self.vc.prior == "standard":
            zeros = jnp.zeros((batch_size, *self.latent_shape), jnp.float32)
            return zeros, zeros
        return self.prior.apply({"params": model["prior"]}, t)

    def decode(self, model, z, t) -> tuple[jax.Array, jax.Array | None]:
        """p(x | z, t): (mean, log-scale) for logistic, (mean, None) for gaussian."""
        out = self.decoder.apply({"params": model["decoder"]}, z, t)
        if self.vc.likelihood == "logistic":
            return out[..., :3], out[..., 3:]
        return out, None

    def log_likelihood(self, image, mean, log_scale) -> jax.Array:
        """log p(x | z, t) per example [B], in nats."""
        if self.vc.likelihood == "logistic":
            per_value = losses.discretized_logistic_log_prob(image, mean, log_scale)
        else:
            per_value = losses.gaussian_log_prob(image, mean, jnp.log(self.vc.gaussian_sigma))
        return jnp.sum(per_value, axis=(1, 2, 3))

    # -- Method protocol -----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict) -> TrainState:
        k_text, k_enc, k_dec, k_prior = jax.random.split(rng, 4)
        tokens, mask, image = batch["tokens"], batch["mask"], batch["image"]
        model, t = {}, None
        if self.vc.conditional:
            model["text_encoder"] = self.text.init(k_text, tokens, mask)
            t = self.text.encode(model["text_encoder"], tokens, mask).pooled
        z = jnp.zeros((image.shape[0], *self.latent_shape), jnp.float32)
        model["encoder"] = self.encoder.init(k_enc, image, t)["params"]
        model["decoder"] = self.decoder.init(k_dec, z, t)["params"]
        if self.vc.prior == "learned":
            model["prior"] = self.prior.init(k_prior, t)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params={"model": model},
            ema_params={"model": model},
            opt_state={"model": self.optimizer.init(model)},
        )

    def loss_terms(
        self, model, batch: dict, rng: jax.Array, *, train: bool = True
    ) -> dict[str, jax.Array]:
        """Per-example ELBO terms [B] in nats (vdm style: the caller weighs and reduces),
        plus the posterior means [B, ...] for the active-unit count."""
        image = batch["image"]
        k_z, k_text = jax.random.split(rng)
        t = self._text_vector(model, batch, train=train, rng=k_text)
        mean_q, logvar_q = self.posterior(model, image, t)
        z = mean_q + jnp.exp(0.5 * logvar_q) * jax.random.normal(k_z, mean_q.shape)
        mean_x, log_scale = self.decode(model, z, t)
        mean_p, logvar_p = self.prior_params(model, t, image.shape[0])
        kl = losses.gaussian_kl(mean_q, logvar_q, mean_p, logvar_p)
        recon = -self.log_likelihood(image, mean_x, log_scale)
        return {"recon": recon, "kl": kl, "posterior_mean": mean_q}

    def train_step(self, state: TrainState, batch: dict, rng: jax.Array):
        vc = self.vc
        weight = losses.kl_weight(state.step, vc.beta, vc.kl_warmup_steps)

        def loss_fn(model):
            terms = self.loss_terms(model, batch, rng)
            kl_floored = losses.free_bits_kl(terms["kl"], vc.free_bits)
            return jnp.mean(terms["recon"] + weight * kl_floored), terms

        model = state.params["model"]
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = self.optimizer.update(grads, state.opt_state["model"], model)
        model = optax.apply_updates(model, updates)
        params = {"model": model}
        recon = jnp.mean(terms["recon"])
        kl = jnp.mean(jnp.sum(terms["kl"].reshape(terms["kl"].shape[0], -1), axis=1))
        dims = batch["image"][0].size
        metrics = {
            "loss": loss,
            "recon": recon,
            "kl": kl,
            "nelbo": recon + kl,
            "kl_weight": weight,
            "grad_norm": optax.tree.norm(grads),
        }
        if vc.likelihood == "logistic":
            metrics["bits_per_dim"] = losses.bits_per_dim(recon + kl, dims)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, state.step, self.config.optim.ema),
            opt_state={"model": opt_state},
        )
        return new_state, metrics

    def sample(
        self, params, text: dict, rng: jax.Array, *, temperature: float | None = None
    ) -> jax.Array:
        """z ~ p(z | t) with its std scaled by `temperature`, decoded to the likelihood's
        mean (the logistic's location), clipped to [-1, 1]."""
        temperature = self.vc.sample_temperature if temperature is None else temperature
        model = params["model"]
        t = None  # an unconditional VAE ignores the captions
        if self.vc.conditional:
            t = self.text.encode(model["text_encoder"], text["tokens"], text["mask"]).pooled
        mean_p, logvar_p = self.prior_params(model, t, text["tokens"].shape[0])
        z = mean_p + temperature * jnp.exp(0.5 * logvar_p) * jax.random.normal(rng, mean_p.shape)
        return jnp.clip(self.decode(model, z, t)[0], -1.0, 1.0)

    def reconstruct(self, params, batch: dict) -> jax.Array:
        """Images decoded from the posterior mean of each image, clipped to [-1, 1]."""
        model = params["model"]
        t = self._text_vector(model, batch)
        mean_q, _ = self.posterior(model, batch["image"], t)
        return jnp.clip(self.decode(model, mean_q, t)[0], -1.0, 1.0)

    # -- validation (run by the loop) ----------------------------------------------------
    def validation_stats(self, params, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
        """Sums over the batch, to be added across batches, then `validation_metrics`."""
        terms = self.loss_terms(params["model"], batch, rng, train=False)
        mean_q = terms["posterior_mean"].reshape(terms["recon"].shape[0], -1)
        kl = jnp.sum(terms["kl"].reshape(mean_q.shape[0], -1), axis=1)
        return {
            "count": jnp.asarray(mean_q.shape[0], jnp.float32),
            "recon": jnp.sum(terms["recon"]),
            "kl": jnp.sum(kl),
            "mean_sum": jnp.sum(mean_q, axis=0),
            "mean_sq_sum": jnp.sum(jnp.square(mean_q), axis=0),
        }

    def validation_metrics(self, totals: dict) -> dict[str, float]:
        n = float(totals["count"])
        recon, kl = float(totals["recon"]) / n, float(totals["kl"]) / n
        mean = np.asarray(totals["mean_sum"]) / n
        variance = np.asarray(totals["mean_sq_sum"]) / n - mean * mean  # Cov_x(E_q[z_d])
        dims = self.config.data.image_size**2 * 3
        metrics = {
            "recon": recon,
            "kl": kl,
            "nelbo": recon + kl,
            "active_units": float(np.sum(variance > ACTIVE_UNIT_THRESHOLD)),
        }
        if self.vc.likelihood == "logistic":
            metrics["bits_per_dim"] = float(losses.bits_per_dim(recon + kl, dims))
        return metrics
