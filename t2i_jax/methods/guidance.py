"""Classifier-free guidance (Ho & Salimans 2022): the conditional and the unconditional
(empty caption) rows run as one batch of 2B, and their outputs mix as
out_uncond + w (out_cond - out_uncond). Shared by diffusion's denoiser and the VQ-VAE
prior's logits; w = 1 is the conditional model alone and runs a batch of B."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def doubled(cond, null, scale: float):
    """The context of a guided batch: [cond; null] along the batch (any pytree), or cond
    alone when scale == 1."""
    if scale == 1.0:
        return cond
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, null)


def combine(out: jax.Array, batch: int, scale: float) -> jax.Array:
    """Rows [cond; uncond] of a guided batch's output -> uncond + scale (cond - uncond)."""
    if scale == 1.0:
        return out
    cond, uncond = out[:batch], out[batch:]
    return uncond + scale * (cond - uncond)
