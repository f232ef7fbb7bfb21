"""A run's workdir read back: config, text setup, method, latest state, frozen weights."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import config as config_lib
from t2i_jax import sharding
from t2i_jax.checkpoint import Checkpointer, CheckpointMismatch
from t2i_jax.errors import CheckpointError, UserError
from t2i_jax.methods import registry
from t2i_jax.methods.base import Frozen, Method, TrainState
from t2i_jax.runs import frozen_store
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext
from t2i_jax.text.tokenizer import CaptionTokenizer


def batch_spec(
    config: ml_collections.ConfigDict,
    text_features: dict[str, jax.ShapeDtypeStruct] | None = None,
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one training batch (the batch contract). `text_features`: a frozen
    encoder's cached features per example ("text_pooled", "text_seq"; `FeatureCache.
    example_spec`), which the batch then carries too."""
    size, batch = config.data.image_size, config.train.batch_size
    spec = {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        "tokens": jax.ShapeDtypeStruct((batch, config.text.max_len), jnp.int32),
        "mask": jax.ShapeDtypeStruct((batch, config.text.max_len), jnp.bool_),
    }
    for name, example in (text_features or {}).items():
        spec[name] = jax.ShapeDtypeStruct((batch, *example.shape), example.dtype)
    return spec


def abstract_state(method: Method, config: ml_collections.ConfigDict, mesh, frozen: Frozen):
    """The state's shapes with its shardings on `mesh` (parameters and optimizer state by
    their logical axes, see `sharding`), from eval_shape: nothing is allocated (restore
    targets and jit out_shardings)."""
    boxed = jax.eval_shape(method.init, jax.random.key(0), batch_spec(config), frozen)
    min_size = sharding.mesh_config(config).min_shard_size
    shardings = sharding.state_shardings(boxed, mesh, min_size)
    return sharding.abstract_with_sharding(nn.unbox(boxed), shardings)


def run_meta(config: ml_collections.ConfigDict) -> dict:
    """What a checkpoint is of, saved with it: the family and the image size (a state's
    shapes do not show the image size: convolutions take any)."""
    return {"method": config.method, "image_size": config.data.image_size}


def check_meta(meta: dict, config: ml_collections.ConfigDict, where: str) -> None:
    """CheckpointMismatch if a checkpoint's saved run_meta is not the config's (checkpoints
    written before it was saved have none and pass)."""
    for key, wanted in run_meta(config).items():
        if key in meta and meta[key] != wanted:
            raise CheckpointMismatch(
                f"checkpoint {where} is of a run with {key}={meta[key]!r}, the run's config "
                f"has {wanted!r}: checkpoints copied from another run?"
            )


def read_config(workdir: str) -> ml_collections.ConfigDict:
    if not os.path.isdir(workdir):
        raise UserError(f"workdir not found: {workdir}")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{workdir} is not a run directory (no config.json)")
    with open(path) as f:
        return config_lib.from_json(f.read())


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run, ready to sample from: `state.ema_params` are the sampling params."""

    workdir: str
    config: ml_collections.ConfigDict
    method: Method
    state: TrainState
    frozen: Frozen

    @property
    def tokenizer(self) -> CaptionTokenizer:
        return self.method.text_setup.tokenizer

    @property
    def step(self) -> int:
        return int(sharding.to_host(self.state.step))


def load_run(workdir: str, compute_dtype: str | None = None) -> Run:
    """The run's latest checkpoint, with its method and frozen weights, on the run's mesh
    (`mesh` config) over this machine's devices, whatever the mesh it was saved from.
    `compute_dtype` ("float32" or "bfloat16"; None: the run's `train.compute_dtype`) is the
    dtype its networks compute in; the parameters are read as they were saved."""
    config = read_config(workdir)
    if compute_dtype is not None:
        config.train.compute_dtype = compute_dtype
    text = build_text(config, TextContext(workdir, builder=None, seed=config.seed))
    method = registry.build_method(config, text)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        if checkpointer.latest_step() is None:
            raise CheckpointError(f"no checkpoint in {checkpointer.directory}")
        mesh = sharding.make_mesh(config=config)
        frozen = frozen_store.load_or_create(workdir, method, write=False)
        frozen = jax.device_put(frozen, sharding.replicated(mesh))
        # The newest readable checkpoint; newer unreadable ones are named and left alone.
        restored = checkpointer.restore_newest(
            abstract_state(method, config, mesh, frozen),
            check_meta=lambda meta, where: check_meta(meta, config, where),
        )
    finally:
        checkpointer.close()
    return Run(workdir, config, method, restored.state, frozen)
