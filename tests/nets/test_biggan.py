"""BigGAN's parts against closed forms: spectral normalisation against numpy's SVD,
conditional batch norm against its formula, orthogonal regularisation against loops."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.methods import gan_losses as losses
from t2i_jax.nets import spectral_norm as sn
from t2i_jax.nets.biggan import BATCH_STATS, BatchNorm, BigDiscriminator, BigGenerator


def top_singular_value(kernel) -> float:
    matrix = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]).T  # [out, in]
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


@pytest.mark.parametrize(
    "layer, x",
    [
        (sn.SNDense(7), jnp.ones((2, 5))),
        (sn.SNConv(6, (3, 3)), jnp.ones((2, 4, 4, 3))),
    ],
    ids=["dense", "conv"],
)
def test_power_iteration_converges_to_the_largest_singular_value(layer, x):
    variables = nn.unbox(layer.init(jax.random.key(0), x))
    kernel = variables["params"]["kernel"] * 3.0  # a spectral norm far from 1
    params = {"kernel": kernel}
    spectral = variables[sn.SPECTRAL]
    for _ in range(100):
        spectral = sn.power_iterate(params, spectral)
    u = spectral["u"]
    np.testing.assert_allclose(float(sn.sigma(kernel, u)), top_singular_value(kernel), rtol=1e-4)
    assert top_singular_value(sn.normalised(kernel, u)) == pytest.approx(1.0, abs=1e-4)
    # The layer computes with kernel / sigma, and a forward pass leaves u where it was.
    y, moved = layer.apply(
        {"params": {**variables["params"], "kernel": kernel}, sn.SPECTRAL: spectral},
        x,
        mutable=[sn.SPECTRAL],
    )
    np.testing.assert_array_equal(moved[sn.SPECTRAL]["u"], u)
    w = np.asarray(kernel, np.float64) / top_singular_value(kernel)
    if w.ndim == 2:
        expected = np.asarray(x, np.float64) @ w
    else:
        expected = jax.lax.conv_general_dilated(
            np.asarray(x, np.float32), w.astype(np.float32), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-4)


def test_power_iterate_finds_every_kernel_of_a_network():
    """Each u sits at its kernel's path; one call moves all of them."""
    d = BigDiscriminator(image_size=8, channels=8, channel_mults=(1, 2), attention_resolution=8)
    variables = nn.unbox(d.init(jax.random.key(0), jnp.ones((2, 8, 8, 3)), jnp.ones((2, 5))))
    spectral = variables[sn.SPECTRAL]
    moved = sn.power_iterate(variables["params"], spectral)
    before, after = jax.tree.leaves(spectral), jax.tree.leaves(moved)
    assert len(before) == len(after) > 5
    # (A layer with one output has u = +-1, a fixed point.)
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True) if a.size > 1)
    assert all(abs(float(jnp.linalg.norm(u)) - 1.0) < 1e-5 for u in after)


def test_conditional_batch_norm_gains_are_the_text_projection():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (3, 4, 4, 6)) * 2.0 + 1.0
    cond = jax.random.normal(k[1], (3, 5))
    bn = BatchNorm()
    variables = nn.unbox(bn.init(k[2], x, cond, train=True))
    params, spectral = variables["params"], variables[sn.SPECTRAL]

    def projected(name):  # 1 + c W / sigma and c W / sigma, computed here in numpy
        kernel = np.asarray(params[name]["kernel"], np.float64)
        u = np.asarray(spectral[name]["u"], np.float64)
        v = kernel @ u
        v /= np.linalg.norm(v)
        sigma = u @ (kernel.T @ v)
        return np.asarray(cond, np.float64) @ (kernel / sigma)

    gain, bias = 1.0 + projected("gain"), projected("bias")
    xs = np.asarray(x, np.float64)
    mean, var = xs.mean(axis=(0, 1, 2)), xs.var(axis=(0, 1, 2))
    expected = (xs - mean) / np.sqrt(var + 1e-5) * gain[:, None, None] + bias[:, None, None]
    y, updated = bn.apply(variables, x, cond, train=True, mutable=[BATCH_STATS])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    # The running statistics move by momentum 0.9 towards the batch's.
    np.testing.assert_allclose(updated[BATCH_STATS]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated[BATCH_STATS]["var"], 0.9 + 0.1 * var, rtol=1e-5)
    # Another text, same image: another output.
    other = bn.apply(variables, x, cond[::-1], train=True, mutable=[BATCH_STATS])[0]
    assert not np.allclose(other, y, atol=1e-3)
    # Sampling mode normalises by the running statistics, not the batch's.
    running = bn.apply(variables, x, cond, train=False)
    np.testing.assert_allclose(
        running, xs / np.sqrt(1.0 + 1e-5) * gain[:, None, None] + bias[:, None, None], rtol=1e-4
    )


def test_generator_latent_is_hierarchical():
    """Each block reads its own chunk of z: changing one chunk changes the image."""
    g = BigGenerator(image_size=8, channels=8, channel_mults=(2, 1), shared_dim=8,
                     attention_resolution=8)  # fmt: skip
    z = jax.random.normal(jax.random.key(0), (2, 12))  # one block + the first layer: 2 x 6
    text = jax.random.normal(jax.random.key(1), (2, 5))
    variables = nn.unbox(g.init(jax.random.key(2), z, text))
    image = g.apply(variables, z, text)
    assert image.shape == (2, 8, 8, 3)
    for chunk in range(2):
        moved = z.at[:, 6 * chunk : 6 * chunk + 6].add(1.0)
        assert not np.allclose(g.apply(variables, moved, text), image, atol=1e-4), chunk
    # z_dim 11: chunks of 6 and 5.
    odd = nn.unbox(g.init(jax.random.key(2), z[:, :11], text))
    assert odd["params"]["fc"]["kernel"].shape[0] == 6


def test_orthogonal_regularisation_equals_its_closed_form():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(4, 3))  # [in, out]: three filters of four weights
    conv = rng.normal(size=(2, 2, 3, 2))
    params = {"a": {"kernel": jnp.asarray(dense)}, "b": {"kernel": jnp.asarray(conv)},
              "c": {"bias": jnp.ones(3)}}  # fmt: skip

    def off_diagonal(filters):  # filters: [out, fan_in]
        total = 0.0
        for i in range(len(filters)):
            for j in range(len(filters)):
                if i != j:
                    total += float(np.dot(filters[i], filters[j])) ** 2
        return total

    expected = off_diagonal(dense.T) + off_diagonal(conv.reshape(-1, 2).T)
    got = float(losses.orthogonal_regularisation(params))
    assert got == pytest.approx(expected, rel=1e-5)
    # Orthogonal filters of any norms cost nothing.
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0] * np.array([1.0, 2.0, 3.0, 0.5, 4.0])
    assert float(losses.orthogonal_regularisation({"kernel": jnp.asarray(q)})) < 1e-8
