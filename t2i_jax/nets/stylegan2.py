"""StyleGAN2-style (Karras et al. 2020) text-conditional generator and discriminator.

Generator: a mapping MLP over [normalised z, projected text vector] gives w; the synthesis
network starts from a learned 4x4 constant and, per resolution, applies modulated and
demodulated 3x3 convolutions (styles are affine maps of w), per-layer noise with a learned
strength, and skip-connected modulated 1x1 toRGB layers (not demodulated). Truncation is
done by the method on w (`mapping` and `synthesis` are exposed for it).

Discriminator: residual (skip / sqrt 2) downsampling blocks, a minibatch-stddev feature at
4x4, then the text-conditional head (`gan_heads.ConditionalHead`, projection by default).

Simplifications, said plainly: no equalised learning rate, no blur filters in the
resampling (nearest-neighbour up, average-pool down), no style mixing, no path-length
regulariser.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import partitioning as part
from t2i_jax import remat as rematerialise
from t2i_jax.layers import upsample_nearest
from t2i_jax.nets.gan_heads import ConditionalHead


def modulated_conv(
    x: jax.Array, kernel: jax.Array, styles: jax.Array, *, demodulate: bool, eps: float = 1e-8
) -> jax.Array:
    """StyleGAN2's modulated convolution, with a per-sample kernel W_b = W * s_b.

    Computed without building per-sample kernels: conv(x * s_b, W) equals conv(x, W * s_b)
    since s_b scales input channels; demodulation then divides output channel o by
    sqrt(sum_{k, i} (W[k, i, o] s_b[i])^2 + eps).

    Args:
      x: [B, H, W, Cin]; kernel: [kh, kw, Cin, Cout]; styles: [B, Cin].
    """
    y = jax.lax.conv_general_dilated(
        x * styles[:, None, None, :].astype(x.dtype),
        kernel.astype(x.dtype),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if demodulate:
        # sum over (kh, kw, Cin) of (W s)^2 = (s^2) @ (sum_k W^2)   -> [B, Cout]
        energy = jnp.square(styles) @ jnp.sum(jnp.square(kernel), axis=(0, 1))
        y = y * jax.lax.rsqrt(energy + eps)[:, None, None, :].astype(y.dtype)
    return y


class ModulatedConv(nn.Module):
    features: int
    kernel_size: int = 3
    demodulate: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        fan_in = cin * self.kernel_size**2
        kernel = self.param(
            "kernel",
            part.annotated(nn.initializers.normal(1.0 / math.sqrt(fan_in)), part.CONV_AXES),
            (self.kernel_size, self.kernel_size, cin, self.features),
        )
        # Styles are an affine map of w with bias 1, so they start near 1.
        styles = part.Dense(cin, bias_init=nn.initializers.ones, name="style")(w)
        y = modulated_conv(x, kernel, styles, demodulate=self.demodulate)
        return y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)


class StyleLayer(nn.Module):
    """Modulated 3x3 conv, per-pixel noise (learned strength, starting at 0), LeakyReLU."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, w: jax.Array, noise: jax.Array | None) -> jax.Array:
        y = ModulatedConv(self.features, 3, True, self.dtype, name="conv")(x, w)
        if noise is not None:
            strength = self.param("noise_strength", nn.initializers.zeros, ())
            y = y + strength * noise.astype(y.dtype)
        return nn.leaky_relu(y, 0.2) * math.sqrt(2.0)


class StyleGenerator(nn.Module):
    """z [B, z_dim], text [B, D] -> images [B, S, S, 3] (linear RGB; data is in [-1, 1]).

    `mapping(z, text) -> w` and `synthesis(w) -> images` are separate methods, so the
    method can truncate w. Per-layer noise comes from the 'noise' rng (in training and
    sampling, as StyleGAN2's default); `synthesis(w, noise=False)` leaves it out.
    """

    image_size: int = 32
    channels: int = 32
    channel_mults: Sequence[int] = (4, 4, 2, 1)  # 4x4 ... image_size
    w_dim: int = 128
    mapping_layers: int = 4
    text_dim: int = 128
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    def setup(self):
        levels = int(math.log2(self.image_size)) - 2
        if self.image_size < 8 or 2 ** (levels + 2) != self.image_size:
            raise ValueError(f"image_size must be a power of two >= 8, got {self.image_size}")
        if len(self.channel_mults) != levels + 1:
            raise ValueError(f"channel_mults needs {levels + 1} entries for {self.image_size}px")
        self.widths = [self.channels * m for m in self.channel_mults]
        self.text_proj = part.Dense(self.text_dim, dtype=self.dtype, name="text_proj")
        self.mlp = [
            part.Dense(self.w_dim, dtype=self.dtype, name=f"map{i}")
            for i in range(self.mapping_layers)
        ]
        self.const = self.param(
            "const",
            part.annotated(nn.initializers.normal(1.0), (None, None, part.EMBED)),
            (4, 4, self.widths[0]),
        )
        layer = rematerialise.block(StyleLayer, self.remat)
        self.layers = [
            [layer(width, self.dtype, name=f"res{i}_conv{j}") for j in range(1 if i == 0 else 2)]
            for i, width in enumerate(self.widths)
        ]
        self.to_rgb = [
            ModulatedConv(3, 1, False, self.dtype, name=f"res{i}_to_rgb")
            for i in range(len(self.widths))
        ]

    def mapping(self, z: jax.Array, text: jax.Array) -> jax.Array:
        z = z * jax.lax.rsqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True) + 1e-8)
        h = jnp.concatenate([z, self.text_proj(text)], axis=-1)
        for layer in self.mlp:
            h = nn.leaky_relu(layer(h), 0.2)
        return h

    def synthesis(self, w: jax.Array, noise: bool = True) -> jax.Array:
        b = w.shape[0]
        x = jnp.broadcast_to(self.const, (b,) + self.const.shape).astype(self.dtype)
        rgb = None
        for i, layers in enumerate(self.layers):
            if i > 0:
                x = upsample_nearest(x)
            for layer in layers:
                n = jax.random.normal(self.make_rng("noise"), x.shape[:3] + (1,)) if noise else None
                x = layer(x, w, n)
            y = self.to_rgb[i](x, w)
            if rgb is not None:
                rgb = upsample_nearest(rgb)
                y = y + rgb
            rgb = y
        return rgb.astype(jnp.float32)  # linear, as StyleGAN2: see dfgan.py on tanh

    def __call__(self, z: jax.Array, text: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # No dropout or batch statistics.
        return self.synthesis(self.mapping(z, text))


def minibatch_stddev(x: jax.Array, group: int = 4) -> jax.Array:
    """Appends the mean over features of the stddev across groups of samples (one channel)."""
    b, h, w, c = x.shape
    g = math.gcd(group, b)
    y = x.reshape(g, b // g, h, w, c).astype(jnp.float32)
    std = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)  # [b/g, h, w, c]
    feat = jnp.mean(std, axis=(1, 2, 3))  # [b/g]
    feat = jnp.tile(feat, g)[:, None, None, None]
    return jnp.concatenate([x, jnp.broadcast_to(feat, (b, h, w, 1)).astype(x.dtype)], axis=-1)


class StyleDiscriminator(nn.Module):
    """images [B, S, S, 3], text [B, D] -> logits [B]."""

    image_size: int = 32
    channels: int = 32
    channel_mults: Sequence[int] = (1, 2, 4, 4)  # image_size ... 4x4
    conditioning: str = "projection"
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, x: jax.Array, text: jax.Array) -> jax.Array:
        widths = [self.channels * m for m in self.channel_mults]
        conv = functools.partial(part.Conv, dtype=self.dtype)
        h = nn.leaky_relu(conv(widths[0], (1, 1), name="from_rgb")(x.astype(self.dtype)), 0.2)
        for i, width in enumerate(widths[1:]):

            def residual(module, h, i=i, width=width):
                # Defined on `module` (self, or its checkpointed clone): the same names.
                conv = functools.partial(part.Conv, dtype=module.dtype, parent=module)
                r = nn.leaky_relu(conv(h.shape[-1], (3, 3), name=f"block{i}_conv0")(h), 0.2)
                r = nn.avg_pool(conv(width, (3, 3), name=f"block{i}_conv1")(r), (2, 2), (2, 2))
                r = nn.leaky_relu(r, 0.2)
                s = conv(width, (1, 1), use_bias=False, name=f"block{i}_skip")(h)
                return (nn.avg_pool(s, (2, 2), (2, 2)) + r) / math.sqrt(2.0)

            h = rematerialise.inline(residual, self.remat)(self, h)
        h = minibatch_stddev(h)
        h = nn.leaky_relu(conv(widths[-1], (3, 3), name="final_conv")(h), 0.2)
        return ConditionalHead(self.conditioning, dtype=self.dtype, name="head")(h, text)


def build(
    gan: ml_collections.ConfigDict, image_size: int
) -> tuple[StyleGenerator, StyleDiscriminator]:
    """The GAN table's factory (nets/gan_networks.py) from the `gan` config section."""
    g_mults, d_mults = tuple(gan.g_channel_mults), tuple(gan.d_channel_mults)
    return (
        StyleGenerator(image_size, gan.channels, g_mults, gan.w_dim, gan.mapping_layers),
        StyleDiscriminator(image_size, gan.channels, d_mults, gan.conditioning),
    )
