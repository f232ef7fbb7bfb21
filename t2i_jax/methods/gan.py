"""Text-conditional GAN: min_G max_D E[log D(x, t)] + E[log(1 - D(G(z, t), t))] and variants.

Players: the generator ("generator": its text encoder and network) and the discriminator
("discriminator"), each with its own optimizer (TTUR: `optim` for G, `optim_d` for D). The
text encoder learns with the generator; the discriminator reads its sentence vector without
a gradient in its own step. One `train_step` does `gan.n_critic` discriminator updates
(fresh z each) and one generator update, then G's EMA; the generic loop drives it.

Discriminator loss per example (objective from `gan_losses`):
  plain           d_real(D(x, t)) + d_fake(D(G(z, t), t))
  matching-aware  d_real(D(x, t)) + (d_fake(D(G(z, t), t)) + d_fake(D(x, t_mis))) / 2
                  with t_mis the batch's captions rolled by one (GAN-INT-CLS, DF-GAN)
plus `r1_gamma` * R1 on real images every `r1_every` steps, scaled by `r1_every` (lazy R1),
and `ma_gp_weight` * MA-GP (DF-GAN's matching-aware gradient penalty on (x, t)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax.config import choose
from t2i_jax.errors import ConfigError, UserError
from t2i_jax.methods import gan_losses as losses
from t2i_jax.methods.base import Frozen, Method, SampleOption, TrainState, next_state
from t2i_jax.methods.microbatches import Rows
from t2i_jax.nets.gan_heads import CONDITIONINGS
from t2i_jax.nets.gan_networks import GAN_NETWORKS, build_gan_networks
from t2i_jax.optim import make_optimizer
from t2i_jax.text.setup import TextSetup


def check_config(config: ml_collections.ConfigDict) -> None:
    """The `gan` section's values, as one-line ConfigErrors (before any run starts)."""
    gc = config.gan
    choose(GAN_NETWORKS, gc.network, "gan.network")
    if gc.objective not in losses.OBJECTIVES:
        raise ConfigError(f"unknown gan.objective '{gc.objective}'; choose {losses.OBJECTIVES}")
    if gc.conditioning not in CONDITIONINGS:
        raise ConfigError(f"unknown gan.conditioning '{gc.conditioning}'; choose {CONDITIONINGS}")
    for key in ("n_critic", "r1_every", "z_dim", "channels"):
        if not isinstance(gc[key], int) or gc[key] < 1:
            raise ConfigError(f"gan.{key} must be a positive int, got {gc[key]!r}")
    size = config.data.image_size
    levels = size.bit_length() - 3
    if size < 8 or 2 ** (levels + 2) != size:
        raise ConfigError(f"data.image_size must be a power of two >= 8, got {size}")
    for key in ("g_channel_mults", "d_channel_mults"):
        if len(gc[key]) != levels + 1:
            raise ConfigError(
                f"gan.{key} needs {levels + 1} entries for {size}px images, got {tuple(gc[key])}"
            )
    if gc.truncation != 1.0 and gc.network != "stylegan2":
        raise ConfigError("gan.truncation needs gan.network=stylegan2 (a mapping network)")


class GAN(Method):
    """The GAN family."""

    curves = ("d_loss", "g_loss")
    sample_options = (
        SampleOption("truncation", float, "truncation psi (stylegan2; 1: off)", "gan.truncation"),
    )

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        check_config(config)

    def __init__(self, config: ml_collections.ConfigDict, text: TextSetup):
        check_config(config)
        super().__init__(config, text)
        self.gc = gc = config.gan
        generator, discriminator = build_gan_networks(gc, config.data.image_size)
        self.generator, self.discriminator = self.network(generator), self.network(discriminator)
        self.g_optimizer = make_optimizer(config.optim, config.train.steps)
        # D takes n_critic updates per train step: its schedule spans all of them.
        self.d_optimizer = make_optimizer(config.optim_d, config.train.steps * gc.n_critic)

    # -- networks ------------------------------------------------------------------------
    def _text_vector(self, g_params, batch, frozen: Frozen | None = None) -> jax.Array:
        text_params = self.conditioner.params(g_params, frozen)
        return self.conditioner.features(text_params, batch).pooled

    def _generate(self, g_params, z, text_vec, rng, *, train: bool) -> jax.Array:
        return self.generator.apply(
            {"params": g_params["net"]}, z, text_vec, train=train, rngs={"noise": rng}
        )

    def _discriminate(self, d_params, images, text_vec) -> jax.Array:
        return self.discriminator.apply({"params": d_params["net"]}, images, text_vec)

    def _z(self, rng, batch_size: int) -> jax.Array:
        return jax.random.normal(rng, (batch_size, self.gc.z_dim), jnp.float32)

    # -- the contract --------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict, frozen: Frozen | None = None) -> TrainState:
        k_text, k_g, k_d, k_noise = jax.random.split(rng, 4)
        tokens, mask, image = batch["tokens"], batch["mask"], batch["image"]
        g = self.conditioner.init(k_text, tokens, mask)
        text_vec = self.conditioner.encode(self.conditioner.params(g, frozen), tokens, mask).pooled
        z = self._z(k_noise, image.shape[0])
        g["net"] = self.generator.init({"params": k_g, "noise": k_noise}, z, text_vec)["params"]
        d = {"net": self.discriminator.init(k_d, image, text_vec)["params"]}
        return self.new_state(
            {"generator": g, "discriminator": d},
            {"generator": self.g_optimizer, "discriminator": self.d_optimizer},
            ema=["generator"],
        )

    def discriminator_loss(self, d_params, examples, rows: Rows, g_params, rng, step):
        """(scalar loss, metrics) of one discriminator update; G is held fixed. `examples`:
        the real images, their text vectors and the mismatched ones (rolled over the whole
        batch); `rows`: which rows of the step's batch they are."""
        gc = self.gc
        real, text_vec = examples["image"], examples["text_vec"]
        k_z, k_noise = jax.random.split(rng)
        z = rows.normal(k_z, (real.shape[0], gc.z_dim))
        fake = self._generate(g_params, z, text_vec, rows.key(k_noise), train=True)
        fake = jax.lax.stop_gradient(fake)
        l_real = self._discriminate(d_params, real, text_vec)
        l_fake = self._discriminate(d_params, fake, text_vec)
        fake_term = losses.d_fake_loss(gc.objective, l_fake)
        mismatch = {}
        if gc.matching_aware:
            l_mis = self._discriminate(d_params, real, examples["text_mis"])
            fake_term = 0.5 * (fake_term + losses.d_fake_loss(gc.objective, l_mis))
            # How far D tells a real image's own caption from another's: its text use.
            mismatch = {"d_mismatch": jnp.mean(jax.nn.sigmoid(l_mis))}
        adversarial = jnp.mean(losses.d_real_loss(gc.objective, l_real) + fake_term)

        d_of_x = lambda x: self._discriminate(d_params, x, text_vec)
        r1 = jnp.zeros((), jnp.float32)
        if gc.r1_gamma > 0:
            r1 = jax.lax.cond(
                step % gc.r1_every == 0,
                lambda: jnp.mean(losses.r1_penalty(d_of_x, real)),
                lambda: jnp.zeros((), jnp.float32),
            )
        ma_gp = jnp.zeros((), jnp.float32)
        if gc.ma_gp_weight > 0:
            d_of_xt = lambda x, text: self._discriminate(d_params, x, text)
            ma_gp = jnp.mean(
                losses.matching_aware_gp(d_of_xt, real, text_vec, power=gc.ma_gp_power)
            )
        total = adversarial + gc.r1_gamma * gc.r1_every * r1 + gc.ma_gp_weight * ma_gp
        metrics = {
            "d_loss": adversarial,
            "d_real": jnp.mean(jax.nn.sigmoid(l_real)),
            "d_fake": jnp.mean(jax.nn.sigmoid(l_fake)),
            "d_real_logit": jnp.mean(l_real),
            "d_fake_logit": jnp.mean(l_fake),
            "r1": r1,
            "ma_gp": ma_gp,
            **mismatch,
        }
        return total, metrics

    def generator_loss(
        self, g_params, batch, rows: Rows, d_params, rng, frozen: Frozen | None = None
    ):
        """(scalar loss, None) of one generator update; D is held fixed."""
        k_z, k_noise = jax.random.split(rng)
        text_vec = self._text_vector(g_params, batch, frozen)
        z = rows.normal(k_z, (text_vec.shape[0], self.gc.z_dim))
        fake = self._generate(g_params, z, text_vec, rows.key(k_noise), train=True)
        # The text encoder learns through G's conditioning only: a gradient through D's
        # text input would let it move text vectors to where D accepts fakes.
        logits = self._discriminate(d_params, fake, jax.lax.stop_gradient(text_vec))
        return jnp.mean(losses.g_loss(self.gc.objective, logits)), None

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ):
        g_params = state.params["generator"]
        k_d, k_g = jax.random.split(rng)
        text_vec = jax.lax.stop_gradient(self._text_vector(g_params, batch, frozen))
        d_examples = {
            "image": batch["image"],
            "text_vec": text_vec,
            "text_mis": jnp.roll(text_vec, 1, axis=0),  # another example's caption
        }

        d_params, d_opt = state.params["discriminator"], state.opt_state["discriminator"]
        for key in jax.random.split(k_d, self.gc.n_critic):  # n_critic is small and static
            d = self.update(
                self.discriminator_loss, d_params, d_opt, self.d_optimizer, d_examples,
                g_params, key, state.step,
            )  # fmt: skip
            d_params, d_opt = d.params, d.opt_state
        g = self.update(
            self.generator_loss, g_params, state.opt_state["generator"], self.g_optimizer,
            batch, d_params, k_g, frozen,
        )  # fmt: skip
        new_state = next_state(
            state,
            {"generator": g.params, "discriminator": d_params},
            {"generator": g.opt_state, "discriminator": d_opt},
            self.config.optim.ema,
        )
        metrics = dict(d.aux, d_grad_norm=d.grad_norm)  # the last critic update's
        metrics.update(g_loss=g.loss, g_grad_norm=g.grad_norm)
        return new_state, metrics

    def sample(
        self,
        params,
        captions: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        *,
        truncation: float | None = None,
    ):
        """Images in [-1, 1] from G (the EMA params the loop passes).

        truncation psi (StyleGAN2-style generator only): w = c + psi (w - c), where c is the
        mean of w over 64 draws of z for the same caption (the caption's own centre).
        """
        psi = self.gc.truncation if truncation is None else truncation
        g_params = params["generator"]
        text_params = self.conditioner.params(g_params, frozen)
        text_vec = self.conditioner.encode(text_params, captions["tokens"], captions["mask"]).pooled
        k_z, k_noise, k_centre = jax.random.split(rng, 3)
        z = self._z(k_z, text_vec.shape[0])
        if psi == 1.0:
            return jnp.clip(self._generate(g_params, z, text_vec, k_noise, train=False), -1.0, 1.0)
        if not hasattr(self.generator, "mapping"):
            raise UserError(
                f"truncation needs a generator with a mapping network (stylegan2), not "
                f"gan.network='{self.gc.network}'"
            )
        net = {"params": g_params["net"]}
        w = self.generator.apply(net, z, text_vec, method="mapping")
        # The same 64 draws for every caption, so equal captions get equal centres.
        draws, batch = 64, text_vec.shape[0]
        z_c = jnp.repeat(self._z(k_centre, draws), batch, axis=0)  # row d * B + b: z_d
        w_c = self.generator.apply(net, z_c, jnp.tile(text_vec, (draws, 1)), method="mapping")
        centre = jnp.mean(w_c.reshape(draws, batch, -1), axis=0)
        w = centre + psi * (w - centre)
        images = self.generator.apply(net, w, method="synthesis", rngs={"noise": k_noise})
        return jnp.clip(images, -1.0, 1.0)  # the generators' RGB output is linear
