"""Sampling from a method's parameters, and loading a finished or running workdir."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t2i_jax import config as config_lib
from t2i_jax import registry
from t2i_jax.errors import CheckpointError, UserError
from t2i_jax.eval.grid import to_uint8
from t2i_jax.text.assets import TextContext
from t2i_jax.text.tokenizer import CaptionTokenizer
from t2i_jax.train import sharding
from t2i_jax.train.checkpoint import Checkpointer


def make_sampler(method, **options) -> Callable:
    """method.sample with fixed options, jit-compiled: (params, text, rng) -> images."""
    return jax.jit(functools.partial(method.sample, **options))


def sample_images(
    sampler: Callable,
    params,
    tokenizer: CaptionTokenizer,
    prompts: Sequence[str],
    *,
    per_prompt: int,
    rng: jax.Array,
    max_len: int,
) -> np.ndarray:
    """uint8 [P, per_prompt, H, W, 3]: every prompt repeated per_prompt times, one batch."""
    captions = [p for p in prompts for _ in range(per_prompt)]
    tokens, mask = tokenizer.encode(captions, max_len)
    # numpy inputs: jit treats them as replicated, also across processes.
    images = sampler(params, {"tokens": tokens, "mask": mask}, rng)
    images = to_uint8(sharding.to_host(images))
    return images.reshape((len(prompts), per_prompt) + images.shape[1:])


def abstract_state(method, config: ml_collections.ConfigDict, mesh):
    """The state's shapes and shardings, from eval_shape: nothing is allocated."""
    size, batch = config.data.image_size, config.train.batch_size
    spec = {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        "tokens": jax.ShapeDtypeStruct((batch, config.text.max_len), jnp.int32),
        "mask": jax.ShapeDtypeStruct((batch, config.text.max_len), jnp.bool_),
    }
    shapes = jax.eval_shape(method.init, jax.random.key(0), spec)
    return spec, sharding.abstract_with_sharding(shapes, sharding.replicated(mesh))


def load_run(workdir: str):
    """(config, tokenizer, method, state) of a run's latest checkpoint."""
    if not os.path.isdir(workdir):
        raise UserError(f"workdir not found: {workdir}")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{workdir} is not a run directory (no config.json)")
    with open(config_path) as f:
        config = config_lib.from_json(f.read())
    text = registry.build_text(config, TextContext(workdir, builder=None, seed=config.seed))
    tokenizer = text.tokenizer
    method = registry.build_method(config, text)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step = checkpointer.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    _, target = abstract_state(method, config, sharding.make_mesh())
    state = checkpointer.restore(step, target)
    checkpointer.close()
    return config, tokenizer, method, state
