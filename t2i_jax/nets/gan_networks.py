"""The GAN network table: `gan.network` -> (gan config section, image size) ->
(generator, discriminator) Flax modules. A new network is one module with a `build`
factory and one line here.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import ml_collections

from t2i_jax.config import choose
from t2i_jax.nets import biggan, dfgan, stylegan2

Factory = Callable[[ml_collections.ConfigDict, int], tuple[nn.Module, nn.Module]]

GAN_NETWORKS: dict[str, Factory] = {
    "biggan": biggan.build,
    "dfgan": dfgan.build,
    "stylegan2": stylegan2.build,
}


def build_gan_networks(gan: ml_collections.ConfigDict, image_size: int):
    """(generator, discriminator) of `gan.network`."""
    return choose(GAN_NETWORKS, gan.network, "gan.network")(gan, image_size)
