"""Compiling a config's train step without data or weights, before a job is launched.

`compile_train_step(config, text)` builds the method and the mesh as a run does, takes the
train state's and the frozen weights' shapes from `jax.eval_shape` (nothing is allocated,
no checkpoint is read), lowers the sharded step for abstract inputs and compiles it. It
returns XLA's memory analysis per device and the step's FLOPs. On a CPU this checks that an
accelerator-sized config (the experiments' `full` variants) builds and compiles, and what it
needs per device, so that a broken config fails here rather than on a cluster.

The compiled step depends on the text side only through the encoder's shapes and the
vocabulary size, so `stand_in_text` builds it from the built-in `t2i_shapes` captions
(the same at every image size) rather than from a large data set that may not be here.
"""

from __future__ import annotations

import dataclasses

import jax
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
            f"{_size(self.state_bytes)}, arguments {_size(self.argument_bytes)}, temporaries "
            f"{_size(self.temp_bytes)}, peak {_size(self.peak_bytes)}; "
            f"{self.flops / 1e9:,.1f} GFLOP per step on {self.devices} device(s)"
        )


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def stand_in_text(config: ml_collections.ConfigDict, workdir: str) -> TextSetup:
    """The config's text encoder fitted to the `t2i_shapes` small set's captions (prepared
    under `config.data.dir` on first use), its tokenizer and statistics kept in `workdir`."""
    builder = sources.prepare("t2i_shapes", config.data.dir, "small")
    return build_text(config, TextContext(workdir, builder, config.seed))


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


def compile_train_step(
    config: ml_collections.ConfigDict,
    text: TextSetup,
    devices=None,
    compiler_options: dict | None = None,
) -> CompiledStep:
    """Lowers and compiles the config's sharded train step for abstract inputs, on
    `devices` (default: all). The family's config is checked as the method is built, but
    not what a run reads when it starts (e.g. latent diffusion's autoencoder checkpoint:
    only its run's config). `compiler_options` go to XLA; on CPU devices the default is
    `CPU_COMPILER_OPTIONS`."""
    config_lib.validate(config)
    method = registry.build_method(config, text)
    mesh = sharding.make_mesh(devices, config)
    fns = loop.compile_functions(method, config, mesh, method.frozen_shapes())
    batch = sharding.abstract_with_sharding(batch_spec(config), fns.batch_sharding)
    lowered = fns.step_fn.lower(fns.abstract_state, batch, jax.random.key(0), fns.frozen)
    if compiler_options is None and mesh.devices.flat[0].platform == "cpu":
        compiler_options = CPU_COMPILER_OPTIONS
    memory = lowered.compile(compiler_options).memory_analysis()
    if method.microbatches == 1:
        flops = throughput.step_flops(lowered)
    else:  # the cost analysis counts a loop's body once
        flops = loop.train_step_flops(method, fns, config)

    def field(name: str) -> int:
        return int(getattr(memory, name, 0) or 0)

    return CompiledStep(
        parameters=sum(x.size for x in jax.tree.leaves(fns.abstract_state.params)),
        state_bytes=_shard_bytes(fns.abstract_state),
        argument_bytes=field("argument_size_in_bytes"),
        output_bytes=field("output_size_in_bytes"),
        temp_bytes=field("temp_size_in_bytes"),
        alias_bytes=field("alias_size_in_bytes"),
        flops=flops,
        devices=mesh.size,
    )
