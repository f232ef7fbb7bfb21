"""Rematerialisation (gradient checkpointing) of the networks: `train.remat`.

  none    activations of the forward pass are kept for the backward pass (fastest).
  blocks  every residual, attention and transformer block is a `jax.checkpoint`: only its
          inputs are kept, its inside is recomputed in the backward pass.
  full    as `blocks`, and the whole network is one more checkpoint around them: it keeps
          only its own inputs until its backward pass, which recomputes the forward once
          more. For steps that hold several networks' activations at once (a GAN's D on
          real and fake images, a VQ-VAE with its perceptual network).

Remat changes no parameter and no result, only which activations live in memory (tests/
nets/test_remat.py compares gradients; benchmarks/train_step.py --remat measures memory).
A network takes part by declaring the fields `dtype` and `remat`, building its blocks with
`block(cls, self.remat)` and being built through `configure`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import flax.linen as nn
import jax

REMAT = ("none", "blocks", "full")

# Inside a checkpoint nothing is saved but its inputs: the simplest policy with the largest
# saving. (jax.checkpoint_policies has finer ones; a block is small enough not to need them.)
POLICY = jax.checkpoint_policies.nothing_saveable

M = TypeVar("M", bound=type[nn.Module])


def check_mode(mode: str) -> str:
    if mode not in REMAT:
        raise ValueError(f"unknown remat mode {mode!r}; choose {', '.join(REMAT)}")
    return mode


def checkpointed(cls: M) -> M:
    """`cls` whose `__call__` runs under `jax.checkpoint`. Keyword arguments that are not
    arrays (`train`, `decode`) stay Python values, so code that branches on them still
    traces; arrays, positional or keyword, are the traced inputs. Parameter names and
    values are those of `cls`."""
    call = cls.__call__

    class Checkpointed(cls):  # type: ignore[valid-type, misc]
        def __call__(self, *args, **kwargs):
            traced = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
            static = {k: v for k, v in kwargs.items() if k not in traced}

            def forward(module, traced_kwargs, *inputs):
                return call(module, *inputs, **traced_kwargs, **static)

            return nn.checkpoint(forward, policy=POLICY)(self, traced, *args)

    # Flax names unnamed submodules after their class: keep the names, hence the params.
    Checkpointed.__name__ = cls.__name__
    Checkpointed.__qualname__ = cls.__qualname__
    Checkpointed.unrematerialised = cls
    return Checkpointed  # type: ignore[return-value]


def block(cls: M, mode: str) -> M:
    """The class a network builds its blocks from under remat `mode`."""
    return checkpointed(cls) if check_mode(mode) != "none" else cls


def configure(network: nn.Module, *, dtype: Any, remat: str) -> nn.Module:
    """`network` computing in `dtype` under remat `mode` (its class checkpointed whole for
    "full"). Every trained network declares `dtype` and `remat`: a missing one is a
    TypeError here, not a setting silently ignored."""
    fields = {f.name for f in dataclasses.fields(network) if f.init}
    missing = {"dtype", "remat"} - fields
    if missing:
        raise TypeError(f"{type(network).__name__} lacks the field(s) {sorted(missing)}")
    cls = getattr(type(network), "unrematerialised", type(network))
    if check_mode(remat) == "full":
        cls = checkpointed(cls)
    values = {name: getattr(network, name) for name in fields if name not in ("parent", "name")}
    return cls(**{**values, "dtype": dtype, "remat": remat})


def inline(fn, mode: str):
    """A block written inline in a compact method, `fn(module, *inputs)` defining its layers
    on `module`, checkpointed under `mode` (call it as `inline(fn, mode)(self, *inputs)`).
    For blocks whose layers sit directly in the network's parameter tree."""
    return nn.checkpoint(fn, policy=POLICY) if check_mode(mode) != "none" else fn
