"""Rematerialisation (`train.remat`) of every trained network: the same parameters and the
same gradients as without it, with the checkpoints really in the backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import remat
from t2i_jax.nets.autoencoder import Decoder, Encoder
from t2i_jax.nets.biggan import BigDiscriminator, BigGenerator
from t2i_jax.nets.code_prior import CodePrior
from t2i_jax.nets.dfgan import DFDiscriminator, DFGenerator
from t2i_jax.nets.stylegan2 import StyleDiscriminator, StyleGenerator
from t2i_jax.nets.unet import UNet
from t2i_jax.text.transformer import TransformerTextEncoder

B = 2
KEY = jax.random.key(0)
image = jax.random.normal(KEY, (B, 8, 8, 3))
text = jax.random.normal(jax.random.key(1), (B, 16))
seq = jax.random.normal(jax.random.key(2), (B, 4, 16))
mask = jnp.array([[True, True, True, False], [True, True, False, False]])
tokens = jnp.array([[3, 5, 7, 0], [2, 4, 0, 0]])

# (network, its inputs, keyword arguments, rngs): the smallest sizes that have blocks.
NETWORKS = {
    "unet": (
        UNet(8, (1, 2), 1, (4,), (8,), num_heads=2, dropout=0.1),
        (image, jnp.array([3.0, 500.0]), seq, mask, text),
        {"train": True},
    ),
    "encoder": (Encoder(8, (1, 2), 1, out_channels=4), (image, text), {}),
    "decoder": (Decoder(8, (1, 2), 1, out_channels=3), (image[:, :4, :4], text), {}),
    "code_prior": (CodePrior(8, 4, width=16, depth=2, num_heads=2), (tokens, seq, mask), {}),
    "text_transformer": (
        TransformerTextEncoder(16, 16, 2, 2, max_len=4, dropout=0.1),
        (tokens, mask),
        {"train": True},
    ),
    "dfgan_g": (DFGenerator(8, 8, (2, 1), 8), (text, text), {}),
    "dfgan_d": (DFDiscriminator(8, 8, (1, 2)), (image, text), {}),
    "stylegan2_g": (StyleGenerator(8, 8, (2, 1), 8, 2, 8), (text, text), {}),
    "stylegan2_d": (StyleDiscriminator(8, 8, (1, 2)), (image, text), {}),
    "biggan_g": (
        BigGenerator(8, 8, (2, 1), 8, attention_resolution=8),
        (text, text),
        {"train": True},
    ),  # fmt: skip
    "biggan_d": (BigDiscriminator(8, 8, (1, 2), attention_resolution=8), (image, text), {}),
}
RNGS = {"dropout": jax.random.key(5), "noise": jax.random.key(6)}


def scalar(out):
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(out))  # TextFeatures is a pytree


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_remat_keeps_parameters_and_gradients(name):
    network, inputs, kwargs = NETWORKS[name]
    init_rngs = {"params": KEY, **RNGS}
    grads = {}
    for mode in remat.REMAT:
        net = remat.configure(network, dtype=jnp.float32, remat=mode)
        # Collections besides params (BigGAN's spectral vectors and batch statistics) are
        # inputs of the forward pass, not differentiated.
        variables = nn.unbox(net.init(init_rngs, *inputs, **kwargs))
        others = {k: v for k, v in variables.items() if k != "params"}
        init = lambda rngs, net=net: nn.unbox(net.init(rngs, *inputs, **kwargs))["params"]
        if mode == "none":
            reference = jax.jit(init)(init_rngs)
        # The same parameter tree whatever the mode (names, hence init values, included).
        shapes = jax.eval_shape(init, init_rngs)
        assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(jnp.shape, reference)

        def loss(p, net=net, others=others):
            return scalar(net.apply({"params": p, **others}, *inputs, rngs=RNGS, **kwargs))

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(reference))
        assert ("remat" in jaxpr) == (mode != "none"), mode
        if mode != "blocks":  # "full" checkpoints the blocks too, inside its own checkpoint
            grads[mode] = jax.jit(jax.grad(loss))(reference)
    # Recomputing the forward pass runs the same operations; XLA may fuse them otherwise,
    # so round-off only (measured: at most 3e-7 relative to the largest gradient entry).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["none"]))
    for got, want in zip(
        jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["none"]), strict=True
    ):
        np.testing.assert_allclose(got, want, atol=1e-5 * scale)


def test_full_remat_nests_the_network_around_its_blocks():
    network, inputs, kwargs = NETWORKS["encoder"]
    counts = {}
    for mode in remat.REMAT:
        net = remat.configure(network, dtype=jnp.float32, remat=mode)
        params = nn.unbox(net.init(KEY, *inputs))["params"]
        jaxpr = jax.make_jaxpr(
            jax.grad(lambda p, net=net: scalar(net.apply({"params": p}, *inputs)))
        )(params)
        counts[mode] = str(jaxpr).count("remat")
    # The encoder has 3 ResBlocks (one per level and the middle); full adds one around all.
    assert counts["none"] == 0 and counts["full"] > counts["blocks"] > 0


def test_configure_refuses_a_network_without_the_fields():
    with pytest.raises(TypeError, match=r"Dense lacks the field\(s\) \['remat'\]"):
        remat.configure(nn.Dense(3), dtype=jnp.float32, remat="blocks")
    with pytest.raises(ValueError, match="unknown remat mode 'some'"):
        remat.configure(Encoder(), dtype=jnp.float32, remat="some")
