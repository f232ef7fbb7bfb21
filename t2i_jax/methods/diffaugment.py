"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to every image the
discriminator sees, real and fake, so D cannot memorise a small data set and G still gets
a gradient through the augmentation.

Policy `gan.augment`: a comma-separated list of `translation`, `color`, `cutout` (the
paper's "translation,color,cutout"), applied in the policy's order as the reference code
does, with its magnitudes, on images in [-1, 1]:

  color        brightness x + (r - 0.5); saturation (x - mean_c) * 2r + mean_c; contrast
               (x - mean) * (r + 0.5) + mean; r ~ U(0, 1) per image and op
  translation  a shift of up to 1/8 of the side in each direction, zeros moved in
  cutout       a square of half the side set to 0, its centre anywhere in the image

`sample(rows, key, ...)` draws one set of parameters per example; `apply` is a pure,
differentiable function of the images and those parameters, so within a discriminator
update the real image of row i and the fake of row i get the same augmentation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t2i_jax.errors import ConfigError
from t2i_jax.methods.microbatches import Rows

OPS = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5
Params = dict[str, jax.Array]


def parse_policy(policy: str) -> tuple[str, ...]:
    """The ops of a policy string ("" for none), in the order they are applied."""
    names = [n.strip() for n in policy.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPS))
    if unknown:
        raise ConfigError(f"gan.augment: unknown op(s) {unknown}; choose from {', '.join(OPS)}")
    return tuple(dict.fromkeys(names))


def _translation_limit(size: int) -> int:
    return int(size * TRANSLATION_RATIO + 0.5)


def _cutout_size(size: int) -> int:
    return int(size * CUTOUT_RATIO + 0.5)


def sample(rows: Rows, key: jax.Array, batch: int, size: int, policy: str) -> Params:
    """Per-example parameters [batch] of the policy's ops, for `size` x `size` images."""
    ops = parse_policy(policy)
    k_color, k_shift, k_cut = jax.random.split(key, 3)
    params: Params = {}
    if "color" in ops:
        params["color"] = rows.uniform(k_color, (batch, 3))  # brightness, saturation, contrast
    if "translation" in ops:
        limit = _translation_limit(size)
        params["shift"] = rows.randint(k_shift, (batch, 2), -limit, limit + 1)
    if "cutout" in ops:
        cut = _cutout_size(size)
        params["cutout"] = rows.randint(k_cut, (batch, 2), 0, size + (1 - cut % 2))
    return params


def color(images: jax.Array, r: jax.Array) -> jax.Array:
    """Brightness, saturation and contrast with r [B, 3] in [0, 1)."""
    per_image = lambda v: v[:, None, None, None]
    x = images + (per_image(r[:, 0]) - 0.5)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    x = (x - mean) * per_image(r[:, 1] * 2.0) + mean
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) * per_image(r[:, 2] + 0.5) + mean


def translate(images: jax.Array, shift: jax.Array) -> jax.Array:
    """out[b, i, j] = images[b, i + dy, j + dx] where that lies inside, else 0; shift [B, 2]
    is (dy, dx)."""
    height, width = images.shape[1:3]

    def one(image, s):
        rows, cols = jnp.arange(height) + s[0], jnp.arange(width) + s[1]
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))
        moved = image[jnp.clip(rows, 0, height - 1)][:, jnp.clip(cols, 0, width - 1)]
        return jnp.where(inside[..., None], moved, 0.0)

    return jax.vmap(one)(images, shift)


def cutout(images: jax.Array, centre: jax.Array) -> jax.Array:
    """A square of side `_cutout_size` whose top-left is centre - side // 2 (clipped to the
    image) set to 0; centre [B, 2] is (row, column)."""
    height, width = images.shape[1:3]
    side = _cutout_size(height)
    top = centre[:, 0, None] - side // 2
    left = centre[:, 1, None] - side // 2
    rows, cols = jnp.arange(height)[None], jnp.arange(width)[None]
    in_rows = (rows >= top) & (rows < top + side)  # [B, H]
    in_cols = (cols >= left) & (cols < left + side)  # [B, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return images * keep[..., None].astype(images.dtype)


def apply(images: jax.Array, params: Params, policy: str) -> jax.Array:
    """`images` [B, H, W, C] augmented by `params` (`sample`'s for the same policy), op
    by op in the policy's order; an empty policy leaves them as they are."""
    x = images
    for op in parse_policy(policy):
        if op == "color":
            x = color(x, params["color"].astype(x.dtype))
        elif op == "translation":
            x = translate(x, params["shift"])
        else:
            x = cutout(x, params["cutout"])
    return x
