"""Sampling from a method's parameters: one compiled sampler per option set, prompts in
one batch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np

from t2i_jax import sharding
from t2i_jax.grid import to_uint8
from t2i_jax.methods.base import Frozen, Method
from t2i_jax.text.tokenizer import CaptionTokenizer

Sampler = Callable[[object, dict, jax.Array, Frozen], jax.Array]


def make_sampler(method: Method, **options) -> Sampler:
    """method.sample with fixed options, jit-compiled: (params, captions, rng, frozen) ->
    images. Options the family does not declare are refused here, before compiling."""
    method.check_sample_options(options)
    return jax.jit(functools.partial(method.sample, **options))


def sample_images(
    sampler: Sampler,
    params,
    frozen: Frozen,
    tokenizer: CaptionTokenizer,
    prompts: Sequence[str],
    *,
    per_prompt: int,
    rng: jax.Array,
    max_len: int,
) -> np.ndarray:
    """uint8 [P, per_prompt, H, W, 3]: every prompt repeated per_prompt times, one batch,
    split over the devices of the parameters' mesh when they divide it (the random draws do
    not depend on the split: JAX's partitionable threefry)."""
    captions = [p for p in prompts for _ in range(per_prompt)]
    tokens, mask = tokenizer.encode(captions, max_len)
    mesh = sharding.mesh_of(params)
    text = {"tokens": tokens, "mask": mask}
    if mesh is not None:
        text = sharding.put_global(text, sharding.rows_sharding(mesh, len(captions)))
    images = sampler(params, text, rng, frozen)
    images = to_uint8(sharding.to_host(images))
    return images.reshape((len(prompts), per_prompt) + images.shape[1:])
