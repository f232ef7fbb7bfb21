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

from t2i_jax.errors import ConfigError
from t2i_jax.methods import vae_losses as losses
from t2i_jax.methods.base import (
    Frozen,
    Method,
    SampleOption,
    TrainState,
    next_state,
)
from t2i_jax.methods.microbatches import WHOLE, Rows
from t2i_jax.nets.autoencoder import LatentPrior, encoder_decoder, latent_side
from t2i_jax.optim import make_optimizer
from t2i_jax.text.setup import TextSetup

PRIORS = ("learned", "standard")
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.'s threshold on Cov_x(E_q[z_d])


def check_config(config: ml_collections.ConfigDict) -> None:
    vc = config.vae
    latent_side(config.data.image_size, vc.channel_mults, "vae.channel_mults")
    if vc.likelihood not in losses.LIKELIHOODS:
        raise ConfigError(f"unknown vae.likelihood '{vc.likelihood}'; choose {losses.LIKELIHOODS}")
    if vc.prior not in PRIORS:
        raise ConfigError(f"unknown vae.prior '{vc.prior}'; choose {PRIORS}")
    if not vc.conditional and vc.prior != "standard":
        raise ConfigError(
            "vae.conditional=False needs vae.prior=standard (a learned prior reads the text)"
        )
    if vc.gaussian_sigma <= 0:
        raise ConfigError(f"vae.gaussian_sigma must be positive, got {vc.gaussian_sigma}")


class VAE(Method):
    """The conditional VAE."""

    curves = ("loss", "recon", "kl")  # training losses; an instance adds validation's
    sample_options = (
        SampleOption("temperature", float, "scale of the prior's std", "vae.sample_temperature"),
    )

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        check_config(config)

    def __init__(self, config: ml_collections.ConfigDict, text: TextSetup):
        check_config(config)
        super().__init__(config, text)
        self.vc = vc = config.vae
        # Plotted and shown by the loop; validation's bits/dim needs the logistic.
        val = "val_bits_per_dim" if vc.likelihood == "logistic" else "val_nelbo"
        self.curves = (*VAE.curves, val)
        side = latent_side(config.data.image_size, vc.channel_mults, "vae.channel_mults")
        self.latent_shape = (side, side, vc.latent_channels)
        out = 6 if vc.likelihood == "logistic" else 3  # (mean, log-scale) or the mean
        encoder, decoder = encoder_decoder(vc, 2 * vc.latent_channels, out)
        self.encoder, self.decoder = self.network(encoder), self.network(decoder)
        self.prior = self.network(LatentPrior(self.latent_shape, vc.prior_hidden))
        self.optimizer = make_optimizer(config.optim, config.train.steps)

    def load_frozen(self) -> Frozen:
        # An unconditional VAE reads no caption: no text encoder at all.
        return super().load_frozen() if self.vc.conditional else {}

    # -- networks ------------------------------------------------------------------------
    def _text_vector(
        self, model, batch, frozen: Frozen | None = None, *, train=False, rng=None
    ) -> jax.Array | None:
        """The caption's pooled vector; None for an unconditional VAE (vae.conditional)."""
        if not self.vc.conditional:
            return None
        text_params = self.conditioner.params(model, frozen)
        return self.conditioner.features(text_params, batch, train=train, rng=rng).pooled

    def posterior(self, model, image, cond) -> tuple[jax.Array, jax.Array]:
        """q(z | x, cond): (mean, logvar), each [B, *latent_shape]."""
        h = self.encoder.apply({"params": model["encoder"]}, image, cond)
        return jnp.split(h, 2, axis=-1)

    def prior_params(self, model, cond, batch_size: int) -> tuple[jax.Array, jax.Array]:
        if self.vc.prior == "standard":
            zeros = jnp.zeros((batch_size, *self.latent_shape), jnp.float32)
            return zeros, zeros
        return self.prior.apply({"params": model["prior"]}, cond)

    def decode(self, model, z, cond) -> tuple[jax.Array, jax.Array | None]:
        """p(x | z, cond): (mean, log-scale) for logistic, (mean, None) for gaussian."""
        out = self.decoder.apply({"params": model["decoder"]}, z, cond)
        if self.vc.likelihood == "logistic":
            return out[..., :3], out[..., 3:]
        return out, None

    def log_likelihood(self, image, mean, log_scale) -> jax.Array:
        """log p(x | z, cond) per example [B], in nats."""
        if self.vc.likelihood == "logistic":
            per_value = losses.discretized_logistic_log_prob(image, mean, log_scale)
        else:
            per_value = losses.gaussian_log_prob(image, mean, jnp.log(self.vc.gaussian_sigma))
        return jnp.sum(per_value, axis=(1, 2, 3))

    # -- the contract --------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict, frozen: Frozen | None = None) -> TrainState:
        k_text, k_enc, k_dec, k_prior = jax.random.split(rng, 4)
        tokens, mask, image = batch["tokens"], batch["mask"], batch["image"]
        model, cond = {}, None
        if self.vc.conditional:
            model.update(self.conditioner.init(k_text, tokens, mask))
            text_params = self.conditioner.params(model, frozen)
            cond = self.conditioner.encode(text_params, tokens, mask).pooled
        z = jnp.zeros((image.shape[0], *self.latent_shape), jnp.float32)
        model["encoder"] = self.encoder.init(k_enc, image, cond)["params"]
        model["decoder"] = self.decoder.init(k_dec, z, cond)["params"]
        if self.vc.prior == "learned":
            model["prior"] = self.prior.init(k_prior, cond)["params"]
        return self.new_state({"model": model}, {"model": self.optimizer})

    def loss_terms(
        self,
        model,
        batch: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        *,
        train: bool = True,
        rows: Rows = WHOLE,
    ) -> dict[str, jax.Array]:
        """Per-example ELBO terms [B] in nats (vdm style: the caller weighs and reduces),
        plus the posterior means [B, ...] for the active-unit count. `rows`: the microbatch
        `batch` is of the step's batch."""
        image = batch["image"]
        k_z, k_text = jax.random.split(rng)
        cond = self._text_vector(model, batch, frozen, train=train, rng=rows.key(k_text))
        mean_q, logvar_q = self.posterior(model, image, cond)
        z = mean_q + jnp.exp(0.5 * logvar_q) * rows.normal(k_z, mean_q.shape)
        mean_x, log_scale = self.decode(model, z, cond)
        mean_p, logvar_p = self.prior_params(model, cond, image.shape[0])
        kl = losses.gaussian_kl(mean_q, logvar_q, mean_p, logvar_p)
        recon = -self.log_likelihood(image, mean_x, log_scale)
        return {"recon": recon, "kl": kl, "posterior_mean": mean_q}

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ):
        vc = self.vc
        weight = losses.kl_weight(state.step, vc.beta, vc.kl_warmup_steps)

        def loss_fn(model, examples, rows):
            terms = self.loss_terms(model, examples, rng, frozen, rows=rows)
            kl_floored = losses.free_bits_kl(terms["kl"], vc.free_bits)
            return jnp.mean(terms["recon"] + weight * kl_floored), terms

        update = self.update(
            loss_fn, state.params["model"], state.opt_state["model"], self.optimizer, batch
        )
        terms = update.aux
        recon = jnp.mean(terms["recon"])
        kl = jnp.mean(jnp.sum(terms["kl"].reshape(terms["kl"].shape[0], -1), axis=1))
        dims = batch["image"][0].size
        metrics = {
            "loss": update.loss,
            "recon": recon,
            "kl": kl,
            "nelbo": recon + kl,
            "kl_weight": weight,
            "grad_norm": update.grad_norm,
        }
        if vc.likelihood == "logistic":
            metrics["bits_per_dim"] = losses.bits_per_dim(recon + kl, dims)
        new_state = next_state(
            state, {"model": update.params}, {"model": update.opt_state}, self.config.optim.ema
        )
        return new_state, metrics

    def sample(
        self,
        params,
        captions: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        *,
        temperature: float | None = None,
    ) -> jax.Array:
        """z ~ p(z | cond) with its std scaled by `temperature`, decoded to the likelihood's
        mean (the logistic's location), clipped to [-1, 1]."""
        temperature = self.vc.sample_temperature if temperature is None else temperature
        model = params["model"]
        cond = None  # an unconditional VAE ignores the captions
        if self.vc.conditional:
            text_params = self.conditioner.params(model, frozen)
            cond = self.conditioner.encode(text_params, captions["tokens"], captions["mask"]).pooled
        mean_p, logvar_p = self.prior_params(model, cond, captions["tokens"].shape[0])
        z = mean_p + temperature * jnp.exp(0.5 * logvar_p) * jax.random.normal(rng, mean_p.shape)
        return jnp.clip(self.decode(model, z, cond)[0], -1.0, 1.0)

    def reconstruct(self, params, batch: dict, frozen: Frozen | None = None) -> jax.Array:
        """Images decoded from the posterior mean of each image, clipped to [-1, 1]."""
        model = params["model"]
        cond = self._text_vector(model, batch, frozen)
        mean_q, _ = self.posterior(model, batch["image"], cond)
        return jnp.clip(self.decode(model, mean_q, cond)[0], -1.0, 1.0)

    # -- validation (run by the loop) ----------------------------------------------------
    def validation_stats(
        self, params, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ) -> dict[str, jax.Array]:
        """Sums over the batch, to be added across batches, then `validation_metrics`."""
        terms = self.loss_terms(params["model"], batch, rng, frozen, train=False)
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
