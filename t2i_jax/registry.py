"""Explicit name -> factory tables: a new network or method is one file and one line here.

Tables hold factories (not instances) and are read through `get`, which turns an unknown
name into a one-line ConfigError that lists the choices. No import-by-string.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from t2i_jax.errors import ConfigError


def _shapes_builder():
    from t2i_jax.data.shapes_builder import T2iShapes

    return T2iShapes


def _diffusion():
    from t2i_jax.methods.diffusion import Diffusion

    return Diffusion


def _text(factory: str) -> Callable[..., Any]:
    """A text encoder factory of `text/assets.py`: (text config, TextContext) -> TextSide."""

    def build(text: ml_collections.ConfigDict, ctx):
        from t2i_jax.text import assets

        return getattr(assets, factory)(text, ctx)

    return build


def _dfgan(config: ml_collections.ConfigDict):
    from t2i_jax.nets.dfgan import DFDiscriminator, DFGenerator

    g = config.gan
    size = config.data.image_size
    return (
        DFGenerator(size, g.channels, tuple(g.g_channel_mults), g.cond_hidden),
        DFDiscriminator(size, g.channels, tuple(g.d_channel_mults), g.conditioning),
    )


def _stylegan2(config: ml_collections.ConfigDict):
    from t2i_jax.nets.stylegan2 import StyleDiscriminator, StyleGenerator

    g = config.gan
    size = config.data.image_size
    return (
        StyleGenerator(size, g.channels, tuple(g.g_channel_mults), g.w_dim, g.mapping_layers),
        StyleDiscriminator(size, g.channels, tuple(g.d_channel_mults), g.conditioning),
    )


def _gan():
    from t2i_jax.methods.gan import GAN

    return GAN


def _vae():
    from t2i_jax.methods.vae import VAE

    return VAE


def _ldm():
    from t2i_jax.methods.latent_diffusion import LatentDiffusion

    return LatentDiffusion


def _vqvae():
    from t2i_jax.methods.vqvae import VQVAE

    return VQVAE


# Data sets: name -> TFDS builder class (array_record, no TensorFlow).
DATASETS: dict[str, Callable[[], Any]] = {
    "t2i_shapes": _shapes_builder,
}

# Generative families: name -> class(config, TextSide) implementing methods.base.Method.
METHODS: dict[str, Callable[[], Any]] = {
    "diffusion": _diffusion,
    "gan": _gan,
    "vae": _vae,
    "vqvae": _vqvae,
    "ldm": _ldm,
}

# GAN networks: name -> config -> (generator, discriminator) Flax modules.
GAN_NETWORKS: dict[str, Callable[..., Any]] = {
    "dfgan": _dfgan,
    "stylegan2": _stylegan2,
}

# Text encoders: name -> (text config, TextContext) -> TextSide (tokenizer + Flax module
# giving TextFeatures + pretrained params); the factories live in text/assets.py.
TEXT_ENCODERS: dict[str, Callable[..., Any]] = {
    "transformer": _text("transformer"),
    "causal": _text("causal"),
    "bow": _text("bag_of_words"),
    "tfidf": _text("tfidf"),
    "embedding": _text("word_embedding"),
    "bert": _text("bert"),
}


def _checked(table: dict[str, Callable[..., Any]], name: str, key: str) -> Callable[..., Any]:
    if name not in table:
        raise ConfigError(f"unknown {key} '{name}'; choose from {sorted(table)}")
    return table[name]


def get(table: dict[str, Callable[[], Any]], name: str, key: str) -> Any:
    return _checked(table, name, key)()


def check_names(config: ml_collections.ConfigDict) -> None:
    """Fails on an unknown registry name (and a bad method section) before a run creates
    anything on disk."""
    _checked(METHODS, config.method, "method")
    _checked(DATASETS, config.data.name, "data.name")
    _checked(TEXT_ENCODERS, config.text.encoder, "text.encoder")
    if config.method == "gan":
        from t2i_jax.methods.gan import check_config

        _checked(GAN_NETWORKS, config.gan.network, "gan.network")
        check_config(config)
    if config.method == "vae":
        from t2i_jax.methods.vae import check_config as check_vae

        check_vae(config)
    if config.method == "vqvae":
        from t2i_jax.methods.vqvae import check_config as check_vqvae

        check_vqvae(config)
    if config.method == "ldm":
        from t2i_jax.methods.latent_diffusion import check_config as check_ldm

        check_ldm(config)


def build_text(config: ml_collections.ConfigDict, ctx):
    """The run's TextSide (`text/assets.py`) for `config.text.encoder`."""
    return _checked(TEXT_ENCODERS, config.text.encoder, "text.encoder")(config.text, ctx)


def build_gan_networks(config: ml_collections.ConfigDict):
    return _checked(GAN_NETWORKS, config.gan.network, "gan.network")(config)


def build_method(config: ml_collections.ConfigDict, text):
    return get(METHODS, config.method, "method")(config, text)
