"""Logical axis names on parameters, for sharding them over a device mesh (FSDP).

Every trainable kernel names its dimensions with the logical axes below (Flax's logical
partitioning, the maxtext / maxdiffusion convention); `sharding.LOGICAL_RULES` maps the
logical axes to mesh axes. The layer factories here are the Flax layers with annotated
kernels: the same parameter names, shapes and initialisers, so annotating a network changes
none of its numbers. `Module.init` then returns `nn.Partitioned` boxes around the annotated
leaves; `sharding.state_shardings` reads them and `nn.unbox` strips them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

EMBED = "embed"  # a model width: token features, a dense layer's input
MLP = "mlp"  # a dense layer's output (an MLP's hidden width)
HEADS = "heads"  # attention heads
HEAD_DIM = "head_dim"  # features per head
CONV_IN = "conv_in"  # a convolution's input channels
CONV_OUT = "conv_out"  # a convolution's output channels
VOCAB = "vocab"  # rows of an embedding table (tokens, codes, positions)

DENSE_AXES = (EMBED, MLP)  # Dense kernel [in, out]
CONV_AXES = (None, None, CONV_IN, CONV_OUT)  # Conv kernel [kh, kw, in, out]
EMBED_AXES = (VOCAB, EMBED)  # Embed table [rows, features]

Axes = Sequence[str | None]


def annotated(init: Callable, axes: Axes) -> Callable:
    """`init` whose result carries the logical `axes` (one name or None per dimension)."""
    return nn.with_logical_partitioning(init, tuple(axes))


def with_axes_of(template, values):
    """`values` (plain arrays) boxed with the logical axes of `template` (an init's output,
    e.g. from `jax.eval_shape`): pretrained weights shard like freshly initialised ones."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(
        lambda t, v: t.replace_boxed(v) if is_box(t) else v, template, values, is_leaf=is_box
    )


def Dense(
    features: int,
    *,
    kernel_init: Callable = nn.linear.default_kernel_init,
    axes: Axes = DENSE_AXES,
    **kwargs,
) -> nn.Dense:
    return nn.Dense(features, kernel_init=annotated(kernel_init, axes), **kwargs)


def DenseGeneral(
    features: int | Sequence[int],
    *,
    axes: Axes,
    kernel_init: Callable = nn.linear.default_kernel_init,
    **kwargs,
) -> nn.DenseGeneral:
    """`axes` names the kernel's dimensions: the contracted input ones, then the outputs."""
    return nn.DenseGeneral(features, kernel_init=annotated(kernel_init, axes), **kwargs)


def Conv(
    features: int,
    kernel_size: Sequence[int],
    *,
    kernel_init: Callable = nn.linear.default_kernel_init,
    **kwargs,
) -> nn.Conv:
    return nn.Conv(features, kernel_size, kernel_init=annotated(kernel_init, CONV_AXES), **kwargs)


def Embed(
    num_embeddings: int,
    features: int,
    *,
    embedding_init: Callable = nn.linear.default_embed_init,
    **kwargs,
) -> nn.Embed:
    return nn.Embed(
        num_embeddings, features, embedding_init=annotated(embedding_init, EMBED_AXES), **kwargs
    )
