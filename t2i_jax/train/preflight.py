"""Compiling a config's train step without data or weights, before a job is launched.

`lower_train_step(config, text)` builds the method and the mesh as a run does, takes the
train state's and the frozen weights' shapes from `jax.eval_shape` (nothing is allocated,
no checkpoint is read) and lowers the sharded step for abstract inputs: the state's size
and the step's FLOPs. `compile_train_step` also compiles it and returns XLA's memory
analysis per device. On a CPU this checks that an accelerator-sized config (the
experiments' `full` variants) builds and compiles, and what it needs per device, so that a
broken config fails here rather than on a cluster.

The compiled step depends on the text side only through the encoder's shapes and the
vocabulary size, so `stand_in_text` builds it from the built-in `t2i_shapes` captions
(the same at every image size) rather than from a large data set that may not be here.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax import config as config_lib
from t2i_jax import sharding
from t2i_jax.data import sources
from t2i_jax.methods import registry
from t2i_jax.runs.loading import batch_spec
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext, TextSetup
from t2i_jax.train import loop, throughput

GiB = 2**30
# LLVM's optimisation level only: the same HLO passes and buffer assignment (so the same
# memory analysis), a third less compile time on CPU for code that is never run.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """What compiling one train step tells before it runs (bytes are per device)."""

    parameters: int  # trained parameters, all players
    state_bytes: int  # params, EMA and optimizer state on one device
    argument_bytes: int  # XLA memory analysis: inputs (state, batch, frozen weights)
    output_bytes: int  # outputs (the new state aliases the donated one)
    temp_bytes: int  # activations and other temporaries
    alias_bytes: int  # outputs written in place of donated inputs
    flops: float  # one step, all devices (XLA cost analysis)
    devices: int

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries, donated buffers counted once."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def summary(self) -> str:
        return (
            f"{self.parameters / 1e6:.1f}M params; per device: state "
            f"{format_bytes(self.state_bytes)}, arguments {format_bytes(self.argument_bytes)}, "
            f"temporaries {format_bytes(self.temp_bytes)}, peak {format_bytes(self.peak_bytes)}; "
            f"{self.flops / 1e9:,.1f} GFLOP per step on {self.devices} device(s)"
        )


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def stand_in_text(config: ml_collections.ConfigDict, workdir: str) -> TextSetup:
    """The config's text encoder fitted to the `t2i_shapes` small set's captions (prepared
    under `config.data.dir` on first use), its tokenizer and statistics kept in `workdir`."""
    builder = sources.prepare("t2i_shapes", config.data.dir, "small")
    return build_text(config, TextContext(workdir, builder, config.seed))


def stand_in_autoencoder(vae_config: ml_collections.ConfigDict, workdir: str) -> str:
    """A workdir for a latent-diffusion config's `ldm.autoencoder` holding only the
    config.json of `vae_config` made text-free: all that building or compiling the LDM
    reads of its VAE run (a trained run adds the checkpoints a real run starts from)."""
    vae = copy.deepcopy(vae_config)
    config_lib.apply_overrides(vae, ["vae.conditional=False", "vae.prior=standard"])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(vae))
    return workdir


def _shard_bytes(tree) -> int:
    """Bytes of one device's shard of every leaf of an abstract, sharded pytree."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        count = 1
        for n in shape:
            count *= n
        total += count * leaf.dtype.itemsize
    return total


@dataclasses.dataclass(frozen=True)
class LoweredStep:
    """A config's sharded train step lowered for abstract inputs: traced, shapes and
    shardings checked, not yet compiled."""

    lowered: jax.stages.Lowered
    parameters: int  # trained parameters, all players
    state_bytes: int  # params, EMA and optimizer state on one device
    flops: float  # one step, all devices (XLA cost analysis)
    devices: int
    platform: str


def cached_feature_spec(
    config: ml_collections.ConfigDict, text: TextSetup
) -> dict[str, jax.ShapeDtypeStruct] | None:
    """What a run's batches carry per example from the text feature cache (a frozen encoder
    with `text.cache_features`, as over one caption per image), from `jax.eval_shape` of
    the encoder; None when the step runs the encoder on the batch's tokens."""
    if not loop.reads_cached_features(config, text):
        return None
    tokens = jax.ShapeDtypeStruct((1, text.max_len), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, text.max_len), jnp.bool_)
    feats, _ = jax.eval_shape(
        lambda t, m: text.encoder.init_with_output(jax.random.key(0), t, m, train=False),
        tokens,
        mask,
    )
    spec = {"text_pooled": feats.pooled}
    if feats.seq is not None:
        spec["text_seq"] = feats.seq
    return {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in spec.items()}


def lower_train_step(
    config: ml_collections.ConfigDict, text: TextSetup, devices=None
) -> LoweredStep:
    """Builds the method and mesh as a run does and lowers the sharded train step for
    abstract inputs on `devices` (default: all). Tracing checks the config's shapes,
    dtypes and shardings in seconds; XLA's memory analysis needs `compile_train_step`.
    The family's config is checked as the method is built, but not what a run reads when
    it starts (e.g. latent diffusion's autoencoder checkpoint: only its run's config)."""
    config_lib.validate(config)
    method = registry.build_method(config, text)
    mesh = sharding.make_mesh(devices, config)
    fns = loop.compile_functions(method, config, mesh, method.frozen_shapes())
    features = cached_feature_spec(config, text)
    batch = sharding.abstract_with_sharding(batch_spec(config, features), fns.batch_sharding)
    lowered = fns.step_fn.lower(fns.abstract_state, batch, jax.random.key(0), fns.frozen)
    if method.microbatches == 1:
        flops = throughput.step_flops(lowered)
    else:  # the cost analysis counts a loop's body once
        flops = loop.train_step_flops(method, fns, config, features)
    return LoweredStep(
        lowered=lowered,
        parameters=sum(x.size for x in jax.tree.leaves(fns.abstract_state.params)),
        state_bytes=_shard_bytes(fns.abstract_state),
        flops=flops,
        devices=mesh.size,
        platform=mesh.devices.flat[0].platform,
    )


def compile_train_step(
    config: ml_collections.ConfigDict,
    text: TextSetup,
    devices=None,
    compiler_options: dict | None = None,
) -> CompiledStep:
    """`lower_train_step`, then XLA's compile of it and its memory analysis per device.
    `compiler_options` go to XLA; on CPU devices the default is `CPU_COMPILER_OPTIONS`."""
    step = lower_train_step(config, text, devices)
    if compiler_options is None and step.platform == "cpu":
        compiler_options = CPU_COMPILER_OPTIONS
    memory = step.lowered.compile(compiler_options).memory_analysis()

    def field(name: str) -> int:
        return int(getattr(memory, name, 0) or 0)

    return CompiledStep(
        parameters=step.parameters,
        state_bytes=step.state_bytes,
        argument_bytes=field("argument_size_in_bytes"),
        output_bytes=field("output_size_in_bytes"),
        temp_bytes=field("temp_size_in_bytes"),
        alias_bytes=field("alias_size_in_bytes"),
        flops=step.flops,
        devices=step.devices,
    )
