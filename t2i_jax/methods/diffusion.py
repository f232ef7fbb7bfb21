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
import optax

from t2i_jax.methods import samplers, schedules
from t2i_jax.methods.base import TrainState, ema_update
from t2i_jax.methods.text_conditioning import TextConditioner
from t2i_jax.nets.unet import UNet
from t2i_jax.text.assets import TextSide
from t2i_jax.text.features import TextFeatures
from t2i_jax.train.optim import make_optimizer


class Diffusion:
    """The diffusion family behind the `Method` protocol."""

    def __init__(self, config: ml_collections.ConfigDict, text: TextSide):
        self.config = config
        self.dc = config.diffusion
        self.text = TextConditioner(text)
        self.text_encoder = text.encoder
        self.unet = UNet(**self.unet_fields())
        self.optimizer = make_optimizer(
            config.optim,
            config.train.steps,
            frozen=[*self.text.frozen_patterns, *self.frozen_patterns()],
        )
        size = config.data.image_size
        self.sample_shape: tuple[int, ...] = (size, size, 3)  # what the UNet denoises
        self.alpha_bar = jnp.asarray(
            schedules.alphas_cumprod(self.dc.schedule, self.dc.timesteps), jnp.float32
        )
        schedules.target(jnp.zeros(()), jnp.zeros(()), 1.0, self.dc.prediction)  # validate

    def unet_fields(self) -> dict:
        """The UNet's fields: `config.model` (its output has the image's 3 channels)."""
        return self.config.model.to_dict()

    def frozen_patterns(self) -> list[str]:
        """Parameter paths the optimizer keeps fixed besides a frozen text encoder's."""
        return []

    # -- networks ------------------------------------------------------------------
    def _encode(self, params, tokens, mask) -> TextFeatures:
        return self.text.encode(params["text_encoder"], tokens, mask)

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

    # -- Method protocol -----------------------------------------------------------
    def init_model(self, rng: jax.Array, batch: dict) -> dict:
        """The "model" params; `batch["image"]` is what the UNet denoises (shapes only)."""
        k_text, k_unet = jax.random.split(rng)
        tokens, mask, image = batch["tokens"], batch["mask"], batch["image"]
        text_params = self.text.init(k_text, tokens, mask)
        feats = self._encode({"text_encoder": text_params}, tokens, mask)
        t = jnp.zeros((image.shape[0],), jnp.float32)
        unet_params = self.unet.init(
            k_unet, image, t, feats.seq, feats.mask, feats.pooled, train=False
        )["params"]
        return {"text_encoder": text_params, "unet": unet_params}

    def init(self, rng: jax.Array, batch: dict) -> TrainState:
        params = {"model": self.init_model(rng, batch)}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state={"model": self.optimizer.init(params["model"])},
        )

    def loss_terms(self, params, batch: dict, rng: jax.Array, *, train: bool = True) -> jax.Array:
        """Per-example denoising loss (mean over pixels), vdm style: the caller reduces."""
        k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 4)
        x0 = batch["image"]
        t = jax.random.randint(k_t, (x0.shape[0],), 0, self.dc.timesteps)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        drop = jax.random.bernoulli(k_drop, self.dc.p_uncond, (x0.shape[0],))
        k_text, k_unet = jax.random.split(k_dropout)
        feats = self.text.features(params["text_encoder"], batch, drop, train=train, rng=k_text)
        x_t = schedules.q_sample(x0, t, noise, self.alpha_bar)
        output = self._denoise(params, x_t, t, feats, train=train, rng=k_unet)
        target = schedules.target(x0, noise, self.alpha_bar[t], self.dc.prediction)
        return jnp.mean(jnp.square(output - target), axis=(1, 2, 3))

    def train_step(self, state: TrainState, batch: dict, rng: jax.Array):
        def loss_fn(params):
            return jnp.mean(self.loss_terms(params, batch, rng, train=True))

        model = state.params["model"]
        loss, grads = jax.value_and_grad(loss_fn)(model)
        updates, opt_state = self.optimizer.update(grads, state.opt_state["model"], model)
        model = optax.apply_updates(model, updates)
        params = {"model": model}
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, state.step, self.config.optim.ema),
            opt_state={"model": opt_state},
        )
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def sample(
        self,
        params,
        text: dict,
        rng: jax.Array,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
    ) -> jax.Array:
        """Images in [-1, 1]; guidance w: eps_uncond + w (eps_cond - eps_uncond)."""
        dc = self.dc
        guidance = dc.guidance if guidance is None else guidance
        steps = dc.sample_steps if steps is None else steps
        sampler = dc.sampler if sampler is None else sampler
        eta = dc.eta if eta is None else eta
        model = params["model"]
        tokens, mask = text["tokens"], text["mask"]
        batch = tokens.shape[0]
        cond = self._encode(model, tokens, mask)
        if guidance != 1.0:  # Condition and uncondition in one batch of 2B.
            null = self.text.null(model["text_encoder"], batch)
            feats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, null)
        else:
            feats = cond

        def denoise(x_t, t):
            ab = self.alpha_bar[t]
            if guidance != 1.0:
                out = self._denoise(
                    model, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), feats
                )
                out_cond, out_uncond = out[:batch], out[batch:]
                out = out_uncond + guidance * (out_cond - out_uncond)
            else:
                out = self._denoise(model, x_t, t, feats)
            return schedules.to_x0_eps(out, x_t, ab, dc.prediction)

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
        )
        return self.finish(model, x0)

    def finish(self, model, x0: jax.Array) -> jax.Array:
        """The sampler's x0 -> images in [-1, 1] (for pixels: clipped)."""
        del model
        return jnp.clip(x0, -1.0, 1.0)
