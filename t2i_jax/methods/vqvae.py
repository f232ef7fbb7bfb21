"""VQ-VAE with a text-conditional autoregressive prior over its codes (DALL-E 1's recipe).

Networks ("model"):
  encoder, decoder   conv autoencoder (`nets/autoencoder.py`), text-unconditional
  codebook           K codes of dimension D, learned by EMA (`vector_quantizer.py`); frozen
                     for the optimizer, replaced in every step by its EMA update
  text_encoder       the run's text encoder, trained by the prior's loss
  prior              causal transformer over the flattened code grid with cross-attention
                     onto the caption (`nets/code_prior.py`)
  lpips              only with vqvae.perceptual_weight > 0: LPIPS-vgg's backbone (read from
                     vqvae.perceptual_backbone, torchvision's VGG16 file), frozen, stored
                     with the run like any parameter (its linear layers ship with t2i_jax)

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

from t2i_jax.errors import ConfigError, UserError
from t2i_jax.methods import vector_quantizer as vq
from t2i_jax.methods.base import TrainState, ema_update
from t2i_jax.methods.code_sampling import SamplingOptions, check_options, sample_codes
from t2i_jax.methods.text_conditioning import TextConditioner
from t2i_jax.metrics import lpips
from t2i_jax.nets.autoencoder import Decoder, Encoder
from t2i_jax.nets.code_prior import CodePrior
from t2i_jax.nets.lpips_backbones import TORCHVISION_FILES
from t2i_jax.text.assets import TextSide
from t2i_jax.train.optim import make_optimizer

CODEBOOK_PATTERN = "codebook/.*"  # EMA-updated, never by the optimizer
LPIPS_PATTERN = "lpips/.*"  # the perceptual loss's network: a constant


def perceptual_weight(vc: ml_collections.ConfigDict) -> float:
    return float(vc.get("perceptual_weight", 0.0))  # runs from before the option: none


def check_config(config: ml_collections.ConfigDict) -> None:
    vc = config.vqvae
    downsample = 2 ** (len(vc.channel_mults) - 1)
    if config.data.image_size % downsample:
        raise ConfigError(
            f"data.image_size={config.data.image_size} is not divisible by {downsample} "
            f"({len(vc.channel_mults)} levels in vqvae.channel_mults)"
        )
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


def grid_side(config: ml_collections.ConfigDict) -> int:
    return config.data.image_size // 2 ** (len(config.vqvae.channel_mults) - 1)


class VQVAE:
    """VQ-VAE + code prior behind the `Method` protocol."""

    curves = ("recon", "prior_loss", "perplexity")

    def __init__(self, config: ml_collections.ConfigDict, text: TextSide):
        check_config(config)
        self.config = config
        self.vc = vc = config.vqvae
        self.text = TextConditioner(text)
        self.side = grid_side(config)
        net = dict(channels=vc.channels, channel_mults=tuple(vc.channel_mults))
        net.update(num_res_blocks=vc.num_res_blocks)
        self.encoder = Encoder(**net, out_channels=vc.code_dim)
        self.decoder = Decoder(**net, out_channels=3)
        self.prior = CodePrior(
            num_codes=vc.num_codes,
            seq_len=self.side * self.side,
            width=vc.prior_width,
            depth=vc.prior_depth,
            num_heads=vc.prior_heads,
        )
        self.perceptual_weight = perceptual_weight(vc)
        # Read once here (as latent diffusion reads its VAE): `init` stores it in params.
        self.lpips = None
        if self.perceptual_weight > 0:
            self.lpips = lpips.load_lpips("vgg", backbone_weights=vc.perceptual_backbone)
        frozen = [*self.text.frozen_patterns, CODEBOOK_PATTERN]
        if self.lpips is not None:
            frozen.append(LPIPS_PATTERN)
        self.optimizer = make_optimizer(config.optim, config.train.steps, frozen=frozen)

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

    # -- Method protocol -----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict) -> TrainState:
        k_text, k_enc, k_dec, k_code, k_prior = jax.random.split(rng, 5)
        tokens, mask, image = batch["tokens"], batch["mask"], batch["image"]
        text_params = self.text.init(k_text, tokens, mask)
        feats = self.text.encode(text_params, tokens, mask)
        encoder = self.encoder.init(k_enc, image)["params"]
        z_e = self.encoder.apply({"params": encoder}, image)
        codes = jnp.zeros((image.shape[0], self.side * self.side), jnp.int32)
        model = {
            "text_encoder": text_params,
            "encoder": encoder,
            "decoder": self.decoder.init(k_dec, z_e)["params"],
            "codebook": vq.init_state(k_code, self.vc.num_codes, self.vc.code_dim),
            "prior": self.prior.init(k_prior, codes, feats.seq, feats.mask)["params"],
        }
        if self.lpips is not None:
            model["lpips"] = jax.tree.map(jnp.asarray, self.lpips.backbone)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params={"model": model},
            ema_params={"model": model},
            opt_state={"model": self.optimizer.init(model)},
        )

    def autoencode(self, model, image) -> dict[str, jax.Array]:
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
        if self.lpips is not None:
            params = self.lpips.replace(backbone=jax.lax.stop_gradient(model["lpips"]))
            terms["perceptual"] = lpips.lpips_distance(params, out, image)
        return terms

    def prior_loss(self, model, codes, feats) -> jax.Array:
        """Cross-entropy of the codes under the prior, nats per code, per example [B]."""
        codes = jax.lax.stop_gradient(codes)  # the prior never moves the autoencoder
        logits = self.prior_logits(model, codes, feats)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, codes), axis=1)

    def loss_terms(self, model, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
        """The autoencoder's terms and the prior's, captions dropped with p_uncond."""
        terms = self.autoencode(model, batch["image"])
        k_drop, k_text = jax.random.split(rng)
        drop = jax.random.bernoulli(k_drop, self.vc.p_uncond, (batch["image"].shape[0],))
        feats = self.text.features(model["text_encoder"], batch, drop, train=True, rng=k_text)
        terms["prior_loss"] = self.prior_loss(model, terms["codes"], feats)
        return terms

    def train_step(self, state: TrainState, batch: dict, rng: jax.Array):
        vc = self.vc
        k_loss, k_restart = jax.random.split(rng)
        prior_on = (state.step >= vc.prior_start).astype(jnp.float32)

        def loss_fn(model):
            terms = self.loss_terms(model, batch, k_loss)
            loss = terms["recon"] + vc.commitment * terms["commitment"]
            if "perceptual" in terms:
                loss = loss + self.perceptual_weight * terms["perceptual"]
            loss = jnp.mean(loss + prior_on * terms["prior_loss"])
            return loss, terms

        model = state.params["model"]
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = self.optimizer.update(grads, state.opt_state["model"], model)
        model = optax.apply_updates(model, updates)
        flat = terms["z_e"].reshape(-1, vc.code_dim)
        codes = terms["codes"].reshape(-1)
        codebook = vq.ema_update(
            state.params["model"]["codebook"], flat, codes, decay=vc.ema_decay, eps=vc.ema_eps
        )
        codebook, restarted = vq.restart_dead_codes(
            codebook, flat, k_restart, threshold=vc.dead_code_threshold
        )
        model = {**model, "codebook": codebook}
        params = {"model": model}
        ema = ema_update(state.ema_params, params, state.step, self.config.optim.ema)
        ema = {"model": {**ema["model"], "codebook": codebook}}  # the live codebook
        usage = vq.usage(codes, vc.num_codes)
        metrics = {
            "loss": loss,
            "recon": jnp.mean(terms["recon"]),
            "commitment": jnp.mean(terms["commitment"]),
            "prior_loss": jnp.mean(terms["prior_loss"]),
            "perplexity": usage["perplexity"],
            "codes_used": usage["codes_used"],
            "codes_restarted": restarted.astype(jnp.float32),
            "grad_norm": optax.tree.norm(grads),
        }
        if "perceptual" in terms:
            metrics["perceptual"] = jnp.mean(terms["perceptual"])
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state={"model": opt_state}
        )
        return new_state, metrics

    def sample(
        self,
        params,
        text: dict,
        rng: jax.Array,
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
        feats = self.text.encode(model["text_encoder"], text["tokens"], text["mask"])
        null = self.text.null(model["text_encoder"], text["tokens"].shape[0])
        codes = sample_codes(
            self.prior, model["prior"], feats.seq, feats.mask, null.seq, null.mask, rng, options
        )
        return jnp.clip(self.decode_codes(model, codes), -1.0, 1.0)

    def reconstruct(self, params, batch: dict) -> jax.Array:
        """Images decoded from each image's own codes, clipped to [-1, 1]."""
        model = params["model"]
        codes, _ = self.quantize(model, self.encode(model, batch["image"]))
        return jnp.clip(self.decode_codes(model, codes), -1.0, 1.0)

    # -- validation (run by the loop) ----------------------------------------------------
    def validation_stats(self, params, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
        """Sums over the batch; the prior is scored with every caption (none dropped)."""
        del rng  # deterministic: nearest codes, no sampling
        model = params["model"]
        terms = self.autoencode(model, batch["image"])
        feats = self.text.features(model["text_encoder"], batch)
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
