"""The attribute probe: a small CNN that reads a `t2i_shapes` scene's attributes off its image.

Heads (one softmax each; labels are the attribute values themselves, -1 = not in the scene):
  num_objects (classes 0..2; 0 never occurs), shape / color / size / position of object 1,
  shape2 / color2 / size2 / position2 of object 2, relation (two-object scenes).

Object order: in the attributes, object 1 is always the left one ("left of") or the upper one
("above"), whatever order the caption names the objects in (templates such as "{b} to the right
of {a}" name object 2 first). The order is therefore fixed by the image layout, so the probe's
slots can be compared with the attributes directly, and hence with what the caption says.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.data import shapes

# Head name -> number of classes. Attribute values index the classes directly.
HEADS: dict[str, int] = {
    "num_objects": 3,
    "shape": len(shapes.SHAPES),
    "color": len(shapes.COLORS),
    "size": len(shapes.SIZES),
    "position": len(shapes.POSITIONS),
    "shape2": len(shapes.SHAPES),
    "color2": len(shapes.COLORS),
    "size2": len(shapes.SIZES),
    "position2": len(shapes.POSITIONS),
    "relation": len(shapes.RELATIONS),
}


class ConvTower(nn.Module):
    """Conv 3x3 stages (one stride-2 conv each), flattened, then a dense feature layer.

    Flattening (rather than global pooling) keeps where things are, which the position and
    relation heads need. Input: float [B, H, W, 3] in [-1, 1]; output: float32 [B, features].

    Fields:
      channels: output channels of each stage; each stage halves the resolution.
      features: width of the output feature vector.
    """

    channels: tuple[int, ...] = (32, 64, 128)
    features: int = 256

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32)
        for i, c in enumerate(self.channels):
            x = nn.relu(nn.Conv(c, (3, 3), strides=(2, 2), name=f"down{i}")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.features, name="features")(x))


class ProbeOutput(NamedTuple):
    """logits: head name -> [B, classes]; features: [B, D], the penultimate layer."""

    logits: dict[str, jax.Array]
    features: jax.Array


class AttributeProbe(nn.Module):
    """ConvTower features, then one linear head per attribute in `HEADS`.

    `features` (the input of the heads) is the space of the probe Frechet distance.
    """

    channels: tuple[int, ...] = (32, 64, 128)
    features: int = 256

    @nn.compact
    def __call__(self, images: jax.Array) -> ProbeOutput:
        """images float [B, H, W, 3] in [-1, 1] -> ProbeOutput."""
        feats = ConvTower(self.channels, self.features, name="tower")(images)
        logits = {name: nn.Dense(n, name=f"head_{name}")(feats) for name, n in HEADS.items()}
        return ProbeOutput(logits, feats)
