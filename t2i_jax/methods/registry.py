"""The family table: `method` -> its `Method` subclass. A new family is one module and one
line here (a test can add one at run time: `METHODS["mine"] = lambda: MyFamily`).

`check_names` is what every command runs before it writes anything: each registry name
of the config (data set, text encoder, method) and the family's own config check.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from t2i_jax.config import choose
from t2i_jax.data.datasets import check_name as check_data_name
from t2i_jax.methods.base import Method, check_method_config
from t2i_jax.text.encoders import TEXT_ENCODERS
from t2i_jax.text.setup import TextSetup


def _diffusion():
    from t2i_jax.methods.diffusion import Diffusion

    return Diffusion


def _gan():
    from t2i_jax.methods.gan import GAN

    return GAN


def _vae():
    from t2i_jax.methods.vae import VAE

    return VAE


def _vqvae():
    from t2i_jax.methods.vqvae import VQVAE

    return VQVAE


def _ldm():
    from t2i_jax.methods.latent_diffusion import LatentDiffusion

    return LatentDiffusion


# Loaders import on use, so a command imports only the family it runs.
METHODS: dict[str, Callable[[], type[Method]]] = {
    "diffusion": _diffusion,
    "gan": _gan,
    "vae": _vae,
    "vqvae": _vqvae,
    "ldm": _ldm,
}


def method_class(name: str) -> type[Method]:
    cls = choose(METHODS, name, "method")()
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"METHODS['{name}'] gave {cls!r}, not a methods.base.Method subclass")
    return cls


def check_names(config: ml_collections.ConfigDict) -> None:
    """Fails on an unknown registry name or a bad family section before a run creates
    anything on disk."""
    check_data_name(config.data.name, config.data.dir)
    choose(TEXT_ENCODERS, config.text.encoder, "text.encoder")
    check_method_config(method_class(config.method), config)


def build_method(config: ml_collections.ConfigDict, text: TextSetup) -> Method:
    return method_class(config.method)(config, text)
