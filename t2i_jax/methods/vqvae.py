"""VQ-VAE with a text-conditional autoregressive prior over its codes (DALL-E 1's recipe).

Networks ("model"):
  encoder, decoder   conv autoencoder (`nets/autoencoder.py`), text-unconditional
  codebook           K codes of dimension D, learned by EMA (`vector_quantizer.py`); frozen
                     for the optimizer, replaced in every step by its EMA update
  text_encoder       the run's text encoder, trained by the prior's loss
  prior              causal transformer over the flattened code grid with cross-attention
                     onto the caption (`nets/code_prior.py`)
Frozen weights ("lpips"): only with vqvae.perceptual_weight > 0, LPIPS-vgg's backbone
(read from vqvae.perceptual_backbone, torchvision's VGG16 file, into the run's frozen
store; its linear layers ship with t2i_jax)

One train step updates both stages: the autoencoder on
  ||x - dec(z_q)||^2 (mean per value) + commitment * ||z_e - sg(e)||^2
  [+ perceptual_weight * LPIPS-vgg(x, dec(z_q)), VQGAN's perceptual term, when set],
with straight-through gradients, then the codebook's EMA (and a restart of dead codes);
and the prior on the cross-entropy of the codes of the same batch (stop-gradient: the
prior never moves the autoencoder), with captions dropped to the empty caption with
probability `p_uncond` for classifier-free guidance. `prior_start` delays the prior's loss
until the codes have settled (0: from the first step).

Sampling: codes from the prior (`code_sampling`: KV cache, temperature, top-k, top-p,
guidance) -> codebook vectors -> decoder. The EMA parameters sample; their codebook is the
live one, not an average (a restarted code's average would mix two different vectors).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from t2i_jax import precision
from t2i_jax.errors import ConfigError, UserError
from t2i_jax.methods import vector_quantizer as vq
from t2i_jax.methods.base import (
    Frozen,
    Method,
    SampleOption,
    TrainState,
    next_state,
)
from t2i_jax.methods.code_sampling import SamplingOptions, check_options, sample_codes
from t2i_jax.methods.microbatches import WHOLE, Rows
from t2i_jax.nets import lpips
from t2i_jax.nets.autoencoder import encoder_decoder, latent_side
from t2i_jax.nets.code_prior import CodePrior
from t2i_jax.nets.lpips_backbones import TORCHVISION_FILES, backbone_params
from t2i_jax.optim import make_optimizer
from t2i_jax.text.setup import TextSetup

CODEBOOK_PATTERN = "codebook/.*"  # EMA-updated, never by the optimizer
LPIPS = "lpips"  # the perceptual loss's network in the frozen weights


def perceptual_weight(vc: ml_collections.ConfigDict) -> float:
    return float(vc.get("perceptual_weight", 0.0))  # runs from before the option: none


def check_config(config: ml_collections.ConfigDict) -> None:
    vc = config.vqvae
    latent_side(config.data.image_size, vc.channel_mults, "vqvae.channel_mults")
    for key in ("num_codes", "code_dim", "prior_width", "prior_depth", "prior_heads"):
        if not isinstance(vc[key], int) or vc[key] < 1:
            raise ConfigError(f"vqvae.{key} must be a positive int, got {vc[key]!r}")
    if vc.prior_width % vc.prior_heads:
        raise ConfigError(
            f"vqvae.prior_width={vc.prior_width} is not divisible by "
            f"vqvae.prior_heads={vc.prior_heads}"
        )
    try:
        check_options(
            SamplingOptions(vc.temperature, vc.top_k, vc.top_p, vc.guidance), vc.num_codes
        )
    except UserError as e:
        raise ConfigError(f"vqvae sampling: {e}") from None
    if not 0.0 <= vc.ema_decay < 1.0:
        raise ConfigError(f"vqvae.ema_decay must be in [0, 1), got {vc.ema_decay}")
    weight = perceptual_weight(vc)
    if weight < 0:
        raise ConfigError(f"vqvae.perceptual_weight must be >= 0, got {weight}")
    if weight > 0:
        path = vc.get("perceptual_backbone", "")
        name = TORCHVISION_FILES["vgg"]
        if not path:
            raise ConfigError(
                "vqvae.perceptual_weight > 0 needs vqvae.perceptual_backbone: the path of "
                f"torchvision's ImageNet VGG16 file {name} (not downloaded here)"
            )
        if not os.path.isfile(path):
            raise ConfigError(f"vqvae.perceptual_backbone: no file at {path} (expected {name})")


class VQVAE(Method):
    """VQ-VAE + code prior."""

    curves = ("recon", "prior_loss", "perplexity")
    sample_options = (
        SampleOption(
            "temperature", float, "prior softmax temperature (0: greedy)", "vqvae.temperature"
        ),
        SampleOption("top_k", int, "prior: keep the k most likely codes (0: all)", "vqvae.top_k"),
        SampleOption("top_p", float, "prior: nucleus mass (1: all)", "vqvae.top_p"),
        SampleOption("guidance", float, "prior: classifier-free guidance scale", "vqvae.guidance"),
    )

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        check_config(config)

    def __init__(self, config: ml_collections.ConfigDict, text: TextSetup):
        check_config(config)
        super().__init__(config, text)
        self.vc = vc = config.vqvae
        self.side = latent_side(config.data.image_size, vc.channel_mults, "vqvae.channel_mults")
        encoder, decoder = encoder_decoder(vc, vc.code_dim, 3)
        self.encoder, self.decoder = self.network(encoder), self.network(decoder)
        prior = CodePrior(
            num_codes=vc.num_codes,
            seq_len=self.side * self.side,
            width=vc.prior_width,
            depth=vc.prior_depth,
            num_heads=vc.prior_heads,
        )
        self.prior = self.network(prior)
        self.perceptual_weight = perceptual_weight(vc)
        # LPIPS-vgg's linear layers ship with t2i_jax; its backbone is frozen weights.
        self.lpips_linear = None
        if self.perceptual_weight > 0:
            self.lpips_linear = lpips.load_linear_weights("vgg")
        self.optimizer = make_optimizer(config.optim, config.train.steps, frozen=[CODEBOOK_PATTERN])

    def load_frozen(self) -> Frozen:
        frozen = super().load_frozen()
        if self.lpips_linear is not None:
            frozen[LPIPS] = backbone_params("vgg", self.vc.perceptual_backbone)
        return frozen

    # -- the autoencoder -----------------------------------------------------------------
    def encode(self, model, image) -> jax.Array:
        """z_e [B, h, w, D]."""
        return self.encoder.apply({"params": model["encoder"]}, image)

    def quantize(self, model, z_e) -> tuple[jax.Array, jax.Array]:
        """(codes [B, h*w], codebook vectors [B, h, w, D]) of encoder outputs."""
        codebook = model["codebook"]["codebook"]
        flat = z_e.reshape(-1, z_e.shape[-1])
        codes = vq.nearest_codes(flat, codebook)
        return codes.reshape(z_e.shape[0], -1), codebook[codes].reshape(z_e.shape)

    def decode_codes(self, model, codes) -> jax.Array:
        """codes [B, h*w] -> images (unclipped)."""
        vectors = model["codebook"]["codebook"][codes]
        grid = vectors.reshape(codes.shape[0], self.side, self.side, -1)
        return self.decoder.apply({"params": model["decoder"]}, grid)

    # -- the prior -----------------------------------------------------------------------
    def prior_logits(self, model, codes, feats) -> jax.Array:
        """Teacher-forced logits [B, n, K]: the input is [BOS, c_0, ..., c_{n-2}]."""
        bos = jnp.full((codes.shape[0], 1), self.prior.bos, jnp.int32)
        tokens = jnp.concatenate([bos, codes[:, :-1]], axis=1)
        return self.prior.apply({"params": model["prior"]}, tokens, feats.seq, feats.mask)

    # -- the contract --------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict, frozen: Frozen | None = None) -> TrainState:
        k_text, k_enc, k_dec, k_code, k_prior = jax.random.split(rng, 5)
        tokens, mask, image = batch["tokens"], batch["mask"], batch["image"]
        model = self.conditioner.init(k_text, tokens, mask)
        text_params = self.conditioner.params(model, frozen)
        feats = self.conditioner.encode(text_params, tokens, mask)
        encoder = self.encoder.init(k_enc, image)["params"]
        z_e = self.encoder.apply({"params": encoder}, image)
        codes = jnp.zeros((image.shape[0], self.side * self.side), jnp.int32)
        model.update(
            encoder=encoder,
            decoder=self.decoder.init(k_dec, z_e)["params"],
            codebook=vq.logical_axes(vq.init_state(k_code, self.vc.num_codes, self.vc.code_dim)),
            prior=self.prior.init(k_prior, codes, feats.seq, feats.mask)["params"],
        )
        return self.new_state({"model": model}, {"model": self.optimizer})

    def autoencode(self, model, image, frozen: Frozen | None = None) -> dict[str, jax.Array]:
        """Per-example recon (mean squared error), commitment and, when weighted, perceptual
        (LPIPS-vgg) [B], with the codes [B, h*w] and encoder outputs the codebook update
        needs."""
        z_e = self.encode(model, image)
        codes, quantized = self.quantize(model, z_e)
        out = self.decoder.apply({"params": model["decoder"]}, vq.straight_through(z_e, quantized))
        terms = {
            "recon": jnp.mean(jnp.square(out - image), axis=(1, 2, 3)),
            "commitment": vq.commitment_loss(z_e, quantized),
            "codes": codes,
            "z_e": z_e,
        }
        if self.lpips_linear is not None:
            network = lpips.LPIPS(backbone=frozen[LPIPS], linear=self.lpips_linear, net="vgg")
            terms["perceptual"] = lpips.lpips_distance(network, out, image)
        return terms

    def prior_loss(self, model, codes, feats) -> jax.Array:
        """Cross-entropy of the codes under the prior, nats per code, per example [B]."""
        codes = jax.lax.stop_gradient(codes)  # the prior never moves the autoencoder
        logits = self.prior_logits(model, codes, feats)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, codes), axis=1)

    def loss_terms(
        self,
        model,
        batch: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        rows: Rows = WHOLE,
    ) -> dict[str, jax.Array]:
        """The autoencoder's terms and the prior's, captions dropped with p_uncond; `rows`:
        the microbatch `batch` is of the step's batch."""
        terms = self.autoencode(model, batch["image"], frozen)
        k_drop, k_text = jax.random.split(rng)
        drop = rows.bernoulli(k_drop, self.vc.p_uncond, (batch["image"].shape[0],))
        text_params = self.conditioner.params(model, frozen)
        feats = self.conditioner.features(
            text_params, batch, drop, train=True, rng=rows.key(k_text)
        )
        terms["prior_loss"] = self.prior_loss(model, terms["codes"], feats)
        return terms

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ):
        vc = self.vc
        k_loss, k_restart = jax.random.split(rng)
        prior_on = (state.step >= vc.prior_start).astype(jnp.float32)

        def loss_fn(model, examples, rows):
            terms = self.loss_terms(model, examples, k_loss, frozen, rows)
            loss = terms["recon"] + vc.commitment * terms["commitment"]
            if "perceptual" in terms:
                loss = loss + self.perceptual_weight * terms["perceptual"]
            loss = jnp.mean(loss + prior_on * terms["prior_loss"])
            return loss, terms

        update = self.update(
            loss_fn, state.params["model"], state.opt_state["model"], self.optimizer, batch
        )
        terms = update.aux
        flat = terms["z_e"].reshape(-1, vc.code_dim)
        codes = terms["codes"].reshape(-1)
        codebook = vq.ema_update(
            state.params["model"]["codebook"], flat, codes, decay=vc.ema_decay, eps=vc.ema_eps
        )
        codebook, restarted = vq.restart_dead_codes(
            codebook, flat, k_restart, threshold=vc.dead_code_threshold
        )
        # The codebook state is kept in the params' dtype (its update runs in float32).
        codebook = jax.tree.map(
            lambda new, old: new.astype(old.dtype), codebook, state.params["model"]["codebook"]
        )
        model = {**update.params, "codebook": codebook}
        new_state = next_state(
            state, {"model": model}, {"model": update.opt_state}, self.config.optim.ema
        )
        live = precision.cast(codebook, jnp.float32)  # the EMA copy holds the live codebook
        ema = {"model": {**new_state.ema_params["model"], "codebook": live}}
        new_state = new_state.replace(ema_params=ema)
        usage = vq.usage(codes, vc.num_codes)
        metrics = {
            "loss": update.loss,
            "recon": jnp.mean(terms["recon"]),
            "commitment": jnp.mean(terms["commitment"]),
            "prior_loss": jnp.mean(terms["prior_loss"]),
            "perplexity": usage["perplexity"],
            "codes_used": usage["codes_used"],
            "codes_restarted": restarted.astype(jnp.float32),
            "grad_norm": update.grad_norm,
        }
        if "perceptual" in terms:
            metrics["perceptual"] = jnp.mean(terms["perceptual"])
        return new_state, metrics

    def sample(
        self,
        params,
        captions: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance: float | None = None,
    ) -> jax.Array:
        """Images in [-1, 1]: codes from the prior given the captions, then the decoder."""
        vc = self.vc
        options = SamplingOptions(
            temperature=vc.temperature if temperature is None else temperature,
            top_k=vc.top_k if top_k is None else top_k,
            top_p=vc.top_p if top_p is None else top_p,
            guidance=vc.guidance if guidance is None else guidance,
        )
        check_options(options, vc.num_codes)
        model = params["model"]
        text_params = self.conditioner.params(model, frozen)
        feats = self.conditioner.encode(text_params, captions["tokens"], captions["mask"])
        null = self.conditioner.null(text_params, captions["tokens"].shape[0])
        codes = sample_codes(
            self.prior, model["prior"], feats.seq, feats.mask, null.seq, null.mask, rng, options
        )
        return jnp.clip(self.decode_codes(model, codes), -1.0, 1.0)

    def reconstruct(self, params, batch: dict, frozen: Frozen | None = None) -> jax.Array:
        """Images decoded from each image's own codes, clipped to [-1, 1]."""
        model = params["model"]
        codes, _ = self.quantize(model, self.encode(model, batch["image"]))
        return jnp.clip(self.decode_codes(model, codes), -1.0, 1.0)

    # -- validation (run by the loop) ----------------------------------------------------
    def validation_stats(
        self, params, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ) -> dict[str, jax.Array]:
        """Sums over the batch; the prior is scored with every caption (none dropped)."""
        del rng  # deterministic: nearest codes, no sampling
        model = params["model"]
        terms = self.autoencode(model, batch["image"], frozen)
        feats = self.conditioner.features(self.conditioner.params(model, frozen), batch)
        codes = terms["codes"].reshape(-1)
        stats = {
            "count": jnp.asarray(batch["image"].shape[0], jnp.float32),
            "recon": jnp.sum(terms["recon"]),
            "prior_loss": jnp.sum(self.prior_loss(model, terms["codes"], feats)),
            "code_counts": jnp.sum(jax.nn.one_hot(codes, self.vc.num_codes), axis=0),
        }
        if "perceptual" in terms:
            stats["perceptual"] = jnp.sum(terms["perceptual"])
        return stats

    def validation_metrics(self, totals: dict) -> dict[str, float]:
        n = float(totals["count"])
        counts = np.asarray(totals["code_counts"], np.float64)
        p = counts / counts.sum()
        entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
        metrics = {
            "recon": float(totals["recon"]) / n,
            "prior_loss": float(totals["prior_loss"]) / n,
            "perplexity": float(np.exp(entropy)),
            "codes_used": float(np.mean(counts > 0)),
        }
        if "perceptual" in totals:
            metrics["perceptual"] = float(totals["perceptual"]) / n
        return metrics
