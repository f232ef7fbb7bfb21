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
and `ma_gp_weight` * MA-GP (DF-GAN's matching-aware gradient penalty on (x, t)). With
`gan.augment` (DiffAugment) D sees every image, real and fake, augmented: within a D update
row i's real and fake get the same augmentation; the penalties differentiate through it.
G's loss adds `ortho_reg` * BigGAN's orthogonal regularisation of its kernels.

Networks with collections besides `params` (BigGAN: spectral-norm vectors, batch-norm
statistics) keep them in their player's params under "state", which the optimizer never
updates (a frozen group) and the EMA copy holds live, never averaged (as the VQ-VAE's
codebook). The spectral vectors advance one power iteration per train step, before any
update; G's running batch statistics move with G's own update; sampling reads both frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import precision
from t2i_jax.config import choose
from t2i_jax.errors import ConfigError, UserError
from t2i_jax.methods import diffaugment
from t2i_jax.methods import gan_losses as losses
from t2i_jax.methods.base import Frozen, Method, SampleOption, TrainState, next_state
from t2i_jax.methods.microbatches import Rows
from t2i_jax.nets.biggan import BATCH_MOMENTS, BATCH_STATS
from t2i_jax.nets.gan_heads import CONDITIONINGS
from t2i_jax.nets.gan_networks import GAN_NETWORKS, build_gan_networks
from t2i_jax.nets.spectral_norm import SPECTRAL, power_iterate
from t2i_jax.optim import make_optimizer
from t2i_jax.text.setup import TextSetup

STATE = "state"  # a player's non-gradient collections, inside its params
# DiffAugment's key is folded from a loss's key, which still splits into z and noise as
# before DiffAugment existed: runs without it draw exactly what they drew then.
AUGMENT_STREAM = 1

# `gan` keys added after the first GAN runs, and their values in runs made before them.
GAN_DEFAULTS = {
    "ortho_reg": 0.0,
    "augment": "",
    "z_truncation": 0.0,
    "standing_stats": 0,
    "attention_resolution": 0,
}


def setting(gc: ml_collections.ConfigDict, key: str):
    return gc.get(key, GAN_DEFAULTS[key])


def collections_of(module) -> tuple[str, ...]:
    """The variable collections besides `params` a GAN network keeps in the state."""
    return tuple(getattr(module, "stateful_collections", ()))


def truncated_z(rng: jax.Array, shape: tuple[int, ...], threshold: float) -> jax.Array:
    """z ~ N(0, I) with every value beyond +-threshold drawn again until none is (BigGAN's
    truncation trick by resampling): N(0, 1) truncated to [-threshold, threshold], per value.
    A pure function of the key."""

    def beyond(carry):
        return jnp.any(jnp.abs(carry[0]) > threshold)

    def redraw(carry):
        z, key = carry
        key, sub = jax.random.split(key)
        return jnp.where(jnp.abs(z) > threshold, jax.random.normal(sub, shape), z), key

    key, sub = jax.random.split(rng)
    z, _ = jax.lax.while_loop(beyond, redraw, (jax.random.normal(sub, shape), key))
    return z


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
    diffaugment.parse_policy(setting(gc, "augment"))
    for key in ("ortho_reg", "z_truncation"):
        value = setting(gc, key)
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"gan.{key} must be a number >= 0, got {value!r}")
    standing = setting(gc, "standing_stats")
    if not isinstance(standing, int) or standing < 0:
        raise ConfigError(f"gan.standing_stats must be an int >= 0, got {standing!r}")
    generator, _ = build_gan_networks(gc, size)  # module definitions only: nothing runs
    if standing and BATCH_STATS not in collections_of(generator):
        raise ConfigError(
            f"gan.standing_stats needs a generator with batch norm (biggan), not "
            f"gan.network='{gc.network}'"
        )
    if hasattr(generator, "attention_resolution"):
        attention = setting(gc, "attention_resolution")
        allowed = [0] + [2**k for k in range(3, levels + 3)]
        if attention not in allowed:
            raise ConfigError(
                f"gan.attention_resolution must be one of {allowed}, got {attention!r}"
            )


class GAN(Method):
    """The GAN family."""

    curves = ("d_loss", "g_loss")
    sample_options = (
        SampleOption("truncation", float, "truncation psi (stylegan2; 1: off)", "gan.truncation"),
        SampleOption(
            "z_truncation",
            float,
            "draw z within +-this, resampling values beyond (BigGAN's trick; 0: off)",
            "gan.z_truncation",
            absent=GAN_DEFAULTS["z_truncation"],
        ),
        SampleOption(
            "standing_stats",
            int,
            "biggan: batch-norm statistics from this many batches of samples of these "
            "captions, for mixed batches (0: the running statistics of training)",
            "gan.standing_stats",
            absent=GAN_DEFAULTS["standing_stats"],
        ),
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
        self.augment = setting(gc, "augment")
        self.ortho_reg = setting(gc, "ortho_reg")
        frozen = lambda net: (f"{STATE}/.*",) if collections_of(net) else ()
        self.g_optimizer = make_optimizer(
            config.optim, config.train.steps, frozen=frozen(self.generator)
        )
        # D takes n_critic updates per train step: its schedule spans all of them.
        self.d_optimizer = make_optimizer(
            config.optim_d, config.train.steps * gc.n_critic, frozen=frozen(self.discriminator)
        )

    # -- networks ------------------------------------------------------------------------
    def _text_vector(self, g_params, batch, frozen: Frozen | None = None) -> jax.Array:
        text_params = self.conditioner.params(g_params, frozen)
        return self.conditioner.features(text_params, batch).pooled

    @staticmethod
    def _variables(player) -> dict:
        return {"params": player["net"], **player.get(STATE, {})}

    def _generate(self, g_params, z, text_vec, rng, *, train: bool) -> jax.Array:
        """G's images; in training mode its batch norms read the batch's own moments."""
        return self.generator.apply(
            self._variables(g_params), z, text_vec, train=train, rngs={"noise": rng}
        )

    def _generate_updating_stats(self, g_params, z, text_vec, rng):
        """G's images in training mode and its moved running statistics ({} for none)."""
        if BATCH_STATS not in g_params.get(STATE, {}):
            return self._generate(g_params, z, text_vec, rng, train=True), {}
        images, updated = self.generator.apply(
            self._variables(g_params), z, text_vec, train=True, rngs={"noise": rng},
            mutable=[BATCH_STATS],
        )  # fmt: skip
        return images, updated[BATCH_STATS]

    def _discriminate(self, d_params, images, text_vec) -> jax.Array:
        return self.discriminator.apply(self._variables(d_params), images, text_vec)

    def _z(self, rng, batch_size: int, threshold: float = 0.0) -> jax.Array:
        shape = (batch_size, self.gc.z_dim)
        if threshold > 0:
            return truncated_z(rng, shape, threshold)
        return jax.random.normal(rng, shape, jnp.float32)

    def _augment_params(self, rows: Rows, rng, batch: int) -> dict:
        return diffaugment.sample(rows, rng, batch, self.config.data.image_size, self.augment)

    # -- the contract --------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict, frozen: Frozen | None = None) -> TrainState:
        k_text, k_g, k_d, k_noise = jax.random.split(rng, 4)
        tokens, mask, image = batch["tokens"], batch["mask"], batch["image"]
        g = self.conditioner.init(k_text, tokens, mask)
        text_vec = self.conditioner.encode(self.conditioner.params(g, frozen), tokens, mask).pooled
        z = self._z(k_noise, image.shape[0])
        g_vars = self.generator.init({"params": k_g, "noise": k_noise}, z, text_vec)
        d_vars = self.discriminator.init(k_d, image, text_vec)
        d = {}
        for player, net, variables in (
            (g, self.generator, g_vars), (d, self.discriminator, d_vars)
        ):  # fmt: skip
            player["net"] = variables["params"]
            if collections_of(net):
                player[STATE] = {name: variables[name] for name in collections_of(net)}
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
        k_aug = jax.random.fold_in(rng, AUGMENT_STREAM)
        z = rows.normal(k_z, (real.shape[0], gc.z_dim))
        fake = self._generate(g_params, z, text_vec, rows.key(k_noise), train=True)
        fake = jax.lax.stop_gradient(fake)
        # One augmentation per row, the same for its real and its fake image.
        augmentation = self._augment_params(rows, k_aug, real.shape[0])
        d_of = lambda x, text: self._discriminate(
            d_params, diffaugment.apply(x, augmentation, self.augment), text
        )
        l_real = d_of(real, text_vec)
        l_fake = d_of(fake, text_vec)
        fake_term = losses.d_fake_loss(gc.objective, l_fake)
        mismatch = {}
        if gc.matching_aware:
            l_mis = d_of(real, examples["text_mis"])
            fake_term = 0.5 * (fake_term + losses.d_fake_loss(gc.objective, l_mis))
            # How far D tells a real image's own caption from another's: its text use.
            mismatch = {"d_mismatch": jnp.mean(jax.nn.sigmoid(l_mis))}
        adversarial = jnp.mean(losses.d_real_loss(gc.objective, l_real) + fake_term)

        d_of_x = lambda x: d_of(x, text_vec)
        r1 = jnp.zeros((), jnp.float32)
        if gc.r1_gamma > 0:
            r1 = jax.lax.cond(
                step % gc.r1_every == 0,
                lambda: jnp.mean(losses.r1_penalty(d_of_x, real)),
                lambda: jnp.zeros((), jnp.float32),
            )
        ma_gp = jnp.zeros((), jnp.float32)
        if gc.ma_gp_weight > 0:
            ma_gp = jnp.mean(losses.matching_aware_gp(d_of, real, text_vec, power=gc.ma_gp_power))
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
        """(scalar loss, aux) of one generator update; D is held fixed. aux: the adversarial
        and orthogonal terms, and G's moved running statistics, each with a leading axis of
        one (microbatches stack theirs there; the step averages it)."""
        k_z, k_noise = jax.random.split(rng)
        k_aug = jax.random.fold_in(rng, AUGMENT_STREAM)
        text_vec = self._text_vector(g_params, batch, frozen)
        z = rows.normal(k_z, (text_vec.shape[0], self.gc.z_dim))
        fake, stats = self._generate_updating_stats(g_params, z, text_vec, rows.key(k_noise))
        fake = diffaugment.apply(
            fake, self._augment_params(rows, k_aug, fake.shape[0]), self.augment
        )
        # The text encoder learns through G's conditioning only: a gradient through D's
        # text input would let it move text vectors to where D accepts fakes.
        logits = self._discriminate(d_params, fake, jax.lax.stop_gradient(text_vec))
        adversarial = jnp.mean(losses.g_loss(self.gc.objective, logits))
        ortho = jnp.zeros((), jnp.float32)
        if self.ortho_reg > 0:
            ortho = losses.orthogonal_regularisation(g_params["net"])
        aux = {
            "adversarial": adversarial,
            "ortho": ortho,
            "batch_stats": jax.tree.map(lambda x: x[None], stats),
        }
        return adversarial + self.ortho_reg * ortho, aux

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Frozen | None = None
    ):
        # One power iteration per step for every spectrally normalised layer, before any
        # update; the step's forward passes all read these vectors.
        g_params = self._power_iterate(state.params["generator"])
        k_d, k_g = jax.random.split(rng)
        text_vec = jax.lax.stop_gradient(self._text_vector(g_params, batch, frozen))
        d_examples = {
            "image": batch["image"],
            "text_vec": text_vec,
            "text_mis": jnp.roll(text_vec, 1, axis=0),  # another example's caption
        }

        d_params = self._power_iterate(state.params["discriminator"])
        d_opt = state.opt_state["discriminator"]
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
        g_new = g.params
        if g.aux["batch_stats"]:
            moved = jax.tree.map(lambda x: jnp.mean(x, axis=0), g.aux["batch_stats"])
            g_new = self._with_state(g_new, BATCH_STATS, moved)
        new_state = next_state(
            state,
            {"generator": g_new, "discriminator": d_params},
            {"generator": g.opt_state, "discriminator": d_opt},
            self.config.optim.ema,
        )
        if STATE in g_new:  # the EMA generator samples with the live collections
            live = precision.cast(g_new[STATE], jnp.float32)
            ema = {**new_state.ema_params, "generator": {**new_state.ema_params["generator"]}}
            ema["generator"][STATE] = live
            new_state = new_state.replace(ema_params=ema)
        metrics = dict(d.aux, d_grad_norm=d.grad_norm)  # the last critic update's
        metrics.update(g_loss=g.aux["adversarial"], g_grad_norm=g.grad_norm)
        if self.ortho_reg > 0:
            metrics["g_ortho"] = g.aux["ortho"]
        return new_state, metrics

    @staticmethod
    def _with_state(player: dict, collection: str, values) -> dict:
        """`player` with `values` as its `collection`, in the dtypes it had."""
        old = player[STATE][collection]
        values = jax.tree.map(lambda new, o: new.astype(o.dtype), values, old)
        return {**player, STATE: {**player[STATE], collection: values}}

    def _power_iterate(self, player: dict) -> dict:
        if SPECTRAL not in player.get(STATE, {}):
            return player
        updated = power_iterate(player["net"], player[STATE][SPECTRAL])
        return self._with_state(player, SPECTRAL, updated)

    def sample(
        self,
        params,
        captions: dict,
        rng: jax.Array,
        frozen: Frozen | None = None,
        *,
        truncation: float | None = None,
        z_truncation: float | None = None,
        standing_stats: int | None = None,
    ):
        """Images in [-1, 1] from G (the EMA params the loop passes).

        truncation psi (StyleGAN2-style generator only): w = c + psi (w - c), where c is the
        mean of w over 64 draws of z for the same caption (the caption's own centre).
        z_truncation t > 0: every value of z drawn within [-t, t] by resampling (BigGAN).
        standing_stats N > 0 (batch-norm networks): the statistics G normalises with are
        the mean of the batch moments of N batches of samples (these captions, fresh z
        drawn as this sample's), not the running ones of training (BigGAN's standing
        statistics: the EMA weights never produced the running ones).
        """
        psi = self.gc.truncation if truncation is None else truncation
        threshold = setting(self.gc, "z_truncation") if z_truncation is None else z_truncation
        standing = setting(self.gc, "standing_stats") if standing_stats is None else standing_stats
        g_params = params["generator"]
        text_params = self.conditioner.params(g_params, frozen)
        text_vec = self.conditioner.encode(text_params, captions["tokens"], captions["mask"]).pooled
        k_z, k_noise, k_centre = jax.random.split(rng, 3)
        z = self._z(k_z, text_vec.shape[0], threshold)
        if standing > 0:  # (k_centre is StyleGAN2's, which has no batch norm)
            g_params = self._standing(g_params, text_vec, k_centre, standing, threshold)
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

    def _standing(self, g_params, text_vec, rng, batches: int, threshold: float):
        """g_params whose batch statistics are the mean moments of `batches` batches."""
        if BATCH_STATS not in g_params.get(STATE, {}):
            raise UserError(
                f"standing statistics need a generator with batch norm (biggan), not "
                f"gan.network='{self.gc.network}'"
            )

        def moments(i):
            k_z, k_noise = jax.random.split(jax.random.fold_in(rng, i))
            z = self._z(k_z, text_vec.shape[0], threshold)
            _, sown = self.generator.apply(
                self._variables(g_params), z, text_vec, train=True, rngs={"noise": k_noise},
                mutable=[BATCH_MOMENTS],
            )  # fmt: skip
            return jax.tree.map(lambda m: m[0], sown[BATCH_MOMENTS], is_leaf=_is_sown)

        per_batch = jax.lax.map(moments, jnp.arange(batches))
        return self._with_state(g_params, BATCH_STATS, jax.tree.map(_mean0, per_batch))


def _is_sown(x) -> bool:
    return isinstance(x, tuple)


def _mean0(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=0)
