"""Text-conditional denoising diffusion (DDPM / DDIM) with classifier-free guidance.

Networks: a text encoder (from the registry) and a UNet, trained jointly on the
denoising loss ||f(x_t, t, text) - target||^2 with eps- or v-prediction. Captions are
dropped (replaced by the empty caption) with probability `diffusion.p_uncond`, so one
network gives both the conditional and the unconditional prediction that guidance needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax.errors import ConfigError
from t2i_jax.methods import guidance as cfg
from t2i_jax.methods import samplers, schedules
from t2i_jax.methods.base import Frozen, Method, SampleOption, TrainState, next_state
from t2i_jax.methods.microbatches import WHOLE, Rows
from t2i_jax.nets.unet import POSITION_EMBEDDINGS, UNet
from t2i_jax.optim import make_optimizer
from t2i_jax.text.features import TextFeatures
from t2i_jax.text.setup import TextSetup


def training_noise(
    key: jax.Array,
    shape: tuple[int, ...],
    rows: Rows,
    *,
    offset: float,
    perturbation: float,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """(noise, input_noise) of a training step: x_t is noised with input_noise, the target is
    computed from noise. Both are N(0, I) draws of `shape` [B, H, W, C] unless
    offset > 0: noise + offset * a per-image, per-channel N(0, 1) shift, for both (offset
    noise, Guttenberg 2023: lets the model change an image's mean brightness);
    perturbation > 0: input_noise = noise + perturbation * N(0, I), the target's noise
    unchanged (input perturbation, Ning et al. 2023: against exposure bias).
    With both 0 the noise is exactly the draw of `key`, as before these options."""
    noise = rows.normal(key, shape, dtype)
    if offset:
        shift = rows.normal(jax.random.fold_in(key, 1), (shape[0], 1, 1, shape[-1]), dtype)
        noise = noise + offset * shift
    if not perturbation:
        return noise, noise
    return noise, noise + perturbation * rows.normal(jax.random.fold_in(key, 2), shape, dtype)


class Diffusion(Method):
    """The diffusion family."""

    sample_options = (
        SampleOption("guidance", float, "classifier-free guidance scale w", "diffusion.guidance"),
        SampleOption("steps", int, "sampler steps", "diffusion.sample_steps"),
        SampleOption(
            "sampler",
            str,
            "ddim, ddpm, dpmpp_2m, or euler or heun (on Karras sigmas)",
            "diffusion.sampler",
            samplers.SAMPLERS,
        ),
        SampleOption("eta", float, "DDIM's eta (0: deterministic)", "diffusion.eta"),
        SampleOption(
            "sigma_max",
            float,
            "euler and heun start from this Karras sigma (0: the schedule's largest)",
            "diffusion.sigma_max",
            absent=0.0,  # what runs did before the option
        ),
    )

    @classmethod
    def options_in_effect(cls, options: dict) -> dict:
        """sigma_max moves only the Karras samplers' first sigma."""
        if options.get("sampler") in samplers.KARRAS:
            return dict(options)
        return {k: v for k, v in options.items() if k != "sigma_max"}

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        dc = config.diffusion
        if dc.sampler not in samplers.SAMPLERS:
            raise ConfigError(
                f"unknown diffusion.sampler '{dc.sampler}'; choose {samplers.SAMPLERS}"
            )
        for key in ("min_snr_gamma", "offset_noise", "input_perturbation", "sigma_max"):
            if dc.get(key, 0.0) < 0:
                raise ConfigError(f"diffusion.{key} must be >= 0 (0: off), got {dc[key]}")
        if dc.get("zero_terminal_snr", False) and dc.prediction != "v":
            raise ConfigError(
                "diffusion.zero_terminal_snr needs diffusion.prediction=v: eps-prediction "
                "cannot give x0 at the last step's SNR of 0"
            )
        samplers.check_sampler(dc.sampler, dc.eta)  # eta only with ddim
        position = config.model.get("position_embedding", "none")
        if position not in POSITION_EMBEDDINGS:
            raise ConfigError(
                f"unknown model.position_embedding '{position}'; choose {POSITION_EMBEDDINGS}"
            )
        if position == "sincos":
            widths = {config.model.base_channels * m for m in config.model.channel_mults}
            if any(w % 4 for w in widths):
                raise ConfigError(
                    "model.position_embedding=sincos needs every level's width divisible by "
                    f"4 (model.base_channels x model.channel_mults: {sorted(widths)})"
                )
        schedules.alphas_cumprod(dc.schedule, dc.timesteps, shift=dc.get("schedule_shift", 1.0))
        schedules.target(jnp.zeros(()), jnp.zeros(()), 1.0, dc.prediction)
        if config.method == "diffusion":  # latent diffusion's size is its latents'
            size, levels = config.data.image_size, len(config.model.channel_mults)
            factor = 2 ** (levels - 1)
            if size % factor:
                raise ConfigError(
                    f"data.image_size={size} is not a multiple of {factor}, which the "
                    f"UNet's {levels} levels (model.channel_mults) halve it into"
                )

    def __init__(self, config: ml_collections.ConfigDict, text: TextSetup):
        super().__init__(config, text)
        self.dc = config.diffusion
        self.unet = self.network(UNet(**self.unet_fields()))
        # Frozen networks are not params: the optimizer masks only `optim.freeze`.
        self.optimizer = make_optimizer(config.optim, config.train.steps)
        size = config.data.image_size
        self.sample_shape: tuple[int, ...] = (size, size, 3)  # what the UNet denoises
        # Runs from before the training options have none of their keys: all off.
        schedule = schedules.alphas_cumprod(
            self.dc.schedule,
            self.dc.timesteps,
            self.dc.get("zero_terminal_snr", False),
            shift=self.dc.get("schedule_shift", 1.0),
        )
        self.alpha_bar = jnp.asarray(schedule, jnp.float32)

    def unet_fields(self) -> dict:
        """The UNet's fields: `config.model` (its output has the image's 3 channels)."""
        return self.config.model.to_dict()

    # -- networks ------------------------------------------------------------------
    def _denoise(self, params, x_t, t, feats: TextFeatures, *, train=False, rng=None):
        rngs = {"dropout": rng} if rng is not None else None
        return self.unet.apply(
            {"params": params["unet"]},
            x_t,
            t.astype(jnp.float32),
            feats.seq,
            feats.mask,
            feats.pooled,
            train=train,
            rngs=rngs,
        )

    # -- the contract ----------------------------------------------------------------
    def init_model(self, rng: jax.Array, batch: dict, frozen: Frozen | None) -> dict:
        """The "model" params; `batch["image"]` is what the UNet denoises (shapes only)."""
        k_text, k_unet = jax.random.split(rng)
        tokens, mask, image = batch["tokens"], batch["mask"], batch["image"]
        model = self.conditioner.init(k_text, tokens, mask)
        feats = self.conditioner.encode(self.conditioner.params(model, frozen), tokens, mask)
        timestep = jnp.zeros((image.shape[0],), jnp.float32)
        model["unet"] = self.unet.init(
            k_unet, image, timestep, feats.seq, feats.mask, feats.pooled, train=False
        )["params"]
        return model

    def init(self, rng: jax.Array, batch: dict, frozen: Frozen | None = None) -> TrainState:
        params = {"model": self.init_model(rng, batch, frozen)}
        return self.new_state(params, {"model": self.optimizer})

    def loss_terms(
        self,
        params,
        batch: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        *,
        train: bool = True,
        rows: Rows = WHOLE,
    ) -> jax.Array:
        """Per-example denoising loss (mean over pixels), vdm style: the caller reduces.
        `rows`: the microbatch `batch` is of the step's batch (draws are the batch's)."""
        k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 4)
        dc = self.dc
        x0 = batch["image"]
        t = rows.randint(k_t, (x0.shape[0],), 0, dc.timesteps)
        noise, input_noise = training_noise(
            k_noise,
            x0.shape,
            rows,
            offset=dc.get("offset_noise", 0.0),
            perturbation=dc.get("input_perturbation", 0.0),
            dtype=x0.dtype,
        )
        drop = rows.bernoulli(k_drop, dc.p_uncond, (x0.shape[0],))
        k_text, k_unet = jax.random.split(rows.key(k_dropout))
        text_params = self.conditioner.params(params, frozen)
        feats = self.conditioner.features(text_params, batch, drop, train=train, rng=k_text)
        x_t = schedules.q_sample(x0, t, input_noise, self.alpha_bar)
        output = self._denoise(params, x_t, t, feats, train=train, rng=k_unet)
        alpha_bar_t = self.alpha_bar[t]
        target = schedules.target(x0, noise, alpha_bar_t, dc.prediction)
        loss = jnp.mean(jnp.square(output - target), axis=(1, 2, 3))
        if dc.get("min_snr_gamma", 0.0):
            loss = loss * schedules.min_snr_weight(alpha_bar_t, dc.min_snr_gamma, dc.prediction)
        return loss

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ):
        def loss_fn(model, examples, rows):
            terms = self.loss_terms(model, examples, rng, frozen, train=True, rows=rows)
            return jnp.mean(terms), None

        update = self.update(
            loss_fn, state.params["model"], state.opt_state["model"], self.optimizer, batch
        )
        new_state = next_state(
            state, {"model": update.params}, {"model": update.opt_state}, self.config.optim.ema
        )
        return new_state, {"loss": update.loss, "grad_norm": update.grad_norm}

    def sample(
        self,
        params,
        captions: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        sigma_max: float | None = None,
    ) -> jax.Array:
        """Images in [-1, 1]; guidance w: eps_uncond + w (eps_cond - eps_uncond)."""
        dc = self.dc
        guidance = dc.guidance if guidance is None else guidance
        steps = dc.sample_steps if steps is None else steps
        sampler = dc.sampler if sampler is None else sampler
        eta = dc.eta if eta is None else eta
        sigma_max = dc.get("sigma_max", 0.0) if sigma_max is None else sigma_max
        feats = self.guided_features(params, captions, frozen, guidance)
        denoise = self.guided_denoiser(params, feats, guidance)
        batch = captions["tokens"].shape[0]
        k_init, k_loop = jax.random.split(rng)
        x_T = jax.random.normal(k_init, (batch, *self.sample_shape), jnp.float32)
        timesteps = samplers.sampling_timesteps(dc.timesteps, steps)
        x0 = samplers.sample_loop(
            denoise,
            x_T,
            self.alpha_bar,
            timesteps,
            k_loop,
            sampler=sampler,
            eta=eta,
            clip_denoised=dc.clip_denoised,
            sigma_max=sigma_max,
        )
        return self.finish(frozen, x0)

    def guided_features(
        self, params, captions: dict, frozen: Frozen | None, guidance: float
    ) -> TextFeatures:
        """The captions' features for `guided_denoiser`, encoded once a sample: the
        conditional ones, then (guidance != 1) the empty caption's."""
        text_params = self.conditioner.params(params["model"], frozen)
        tokens, mask = captions["tokens"], captions["mask"]
        cond = self.conditioner.encode(text_params, tokens, mask)
        null = self.conditioner.null(text_params, tokens.shape[0]) if guidance != 1.0 else None
        return cfg.doubled(cond, null, guidance)

    def guided_denoiser(self, params, feats: TextFeatures, guidance: float) -> samplers.Denoiser:
        """The sampler's `denoise(x_t, t, ab) -> (x0, eps)`: one network pass over a batch
        of 2B (B: guidance 1), out_uncond + w (out_cond - out_uncond)."""
        model = params["model"]

        def denoise(x_t, timestep, ab):
            x_in, t_in = cfg.doubled((x_t, timestep), (x_t, timestep), guidance)
            out = cfg.combine(self._denoise(model, x_in, t_in, feats), x_t.shape[0], guidance)
            return schedules.to_x0_eps(out, x_t, ab, self.dc.prediction)

        return denoise

    def finish(self, frozen: Frozen | None, x0: jax.Array) -> jax.Array:
        """The sampler's x0 -> images in [-1, 1] (for pixels: clipped)."""
        del frozen
        return jnp.clip(x0, -1.0, 1.0)
