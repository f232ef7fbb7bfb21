"""Train-step throughput: images/s, XLA FLOPs per step, achieved FLOP/s and their ratio
to a float32 matmul peak measured in the same run on the same devices.

  python benchmarks/train_step.py [--config experiments/diffusion_shapes.py:demo]
      [--steps 20] [--mesh data=1,fsdp=8] [--compute-dtype bfloat16] [--grad-accum 4]
      [--remat none|blocks|full] [--config.KEY=VALUE ...]

Random batches of the config's shapes; the whole mesh of local devices, as in training
(`--mesh` sets the config's mesh sizes; the config's `mesh.cpu_devices` splits the CPU as
`t2i train` does, the demo's into 2; simulate 8 CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and `--config.mesh.cpu_devices=0`).
Also prints the compiled step's memory per device (XLA's memory analysis: arguments,
outputs and temporaries) and its MFU: the step's FLOPs per second over the device's dense
peak (train/throughput.py: a table for accelerators, the float32 matmul peak measured here
for a CPU).
The text side (tokenizer, fitted or pretrained encoder) is built as a run builds it, from
the config's data set (prepared on first use) in a temporary workdir; a frozen encoder
with `text.cache_features` gets random features in the batch, as a run reads its cache.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import config as config_lib
from t2i_jax import sharding
from t2i_jax.cli import _split_config_overrides
from t2i_jax.data import sources
from t2i_jax.methods import registry
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext
from t2i_jax.train import loop, multihost, preflight, throughput


def random_batch(config, vocab_size: int, text_features: dict | None = None) -> dict:
    """Random images and captions; with `text_features` (a frozen encoder whose features a
    run reads from its cache) random features of those shapes too, as the run's batches."""
    b, size, length = config.train.batch_size, config.data.image_size, config.text.max_len
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    mask = jnp.arange(length)[None] < (jnp.arange(b) % (length - 1) + 1)[:, None]
    batch = {
        "image": jax.random.uniform(k1, (b, size, size, 3), minval=-1, maxval=1),
        "tokens": jnp.where(mask, jax.random.randint(k2, (b, length), 3, vocab_size), 0),
        "mask": mask,
    }
    for i, (name, spec) in enumerate(sorted((text_features or {}).items())):
        shape = (b, *spec.shape)
        batch[name] = jax.random.normal(jax.random.fold_in(k3, i), shape, spec.dtype)
    return batch


def measure(config, steps: int) -> dict:
    """The config's compiled train step on random batches: median step time over `steps`
    (after a warm-up step), XLA's FLOPs and memory, parameter and state sizes."""
    builder = sources.prepare(config.data.name, config.data.dir, config.data.variant)
    with tempfile.TemporaryDirectory() as workdir:
        text = build_text(config, TextContext(workdir, builder, config.seed))
    method = registry.build_method(config, text)
    mesh = sharding.make_mesh(config=config)
    fns = loop.compile_functions(method, config, mesh, method.load_frozen())
    state = fns.init(jax.random.key(0))
    features = preflight.cached_feature_spec(config, text)
    batch = random_batch(config, text.vocab_size, features)
    batch = jax.device_put(batch, fns.batch_sharding)
    key = jax.random.key(1)

    lowered = fns.step_fn.lower(state, batch, key, fns.frozen)
    # All devices; K microbatches: all K.
    flops = loop.train_step_flops(method, fns, config, features)
    memory = lowered.compile().memory_analysis()
    per_device = sum(
        getattr(memory, f, 0) or 0
        for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    ) - (getattr(memory, "alias_size_in_bytes", 0) or 0)  # donated state: counted once
    state_bytes = sum(
        s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards[:1]
    )

    state, metrics = fns.train_step(state, batch, key)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = fns.train_step(state, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {
        "step_time": float(np.median(times)),
        "flops": flops,
        "mesh": mesh,
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "state_bytes": state_bytes,
        "step_memory": per_device,
    }


def main() -> None:
    argv, overrides = _split_config_overrides(__import__("sys").argv[1:])
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="experiments/diffusion_shapes.py:demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mesh", default="", help="mesh sizes, e.g. data=1,fsdp=8")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--grad-accum", type=int, help="train.grad_accum_steps")
    parser.add_argument("--remat", choices=("none", "blocks", "full"))
    args = parser.parse_args(argv)
    config = config_lib.load_config(args.config)
    mesh_overrides = [f"mesh.{item}" for item in args.mesh.split(",") if item]
    for key, value in (
        ("compute_dtype", args.compute_dtype),
        ("grad_accum_steps", args.grad_accum),
        ("remat", args.remat),
    ):
        if value is not None:
            overrides.append(f"train.{key}={value}")
    config_lib.apply_overrides(config, overrides + mesh_overrides)
    # As `t2i train` does, before JAX starts (`--config.mesh.cpu_devices=0`: one device).
    multihost.split_cpu(sharding.mesh_config(config).cpu_devices)

    m = measure(config, args.steps)
    step_time, flops, mesh = m["step_time"], m["flops"], m["mesh"]
    peak = throughput.measured_matmul_peak(n=2048, repeats=10)
    device_peak, peak_source = throughput.device_peak(mesh.devices.flat[0])
    achieved = flops / step_time
    params, state_bytes, per_device = m["params"], m["state_bytes"], m["step_memory"]
    devices = jax.devices()
    print(f"config            {args.config} {' '.join(overrides)}")
    print(f"devices           {len(devices)} x {devices[0].device_kind} ({platform.machine()})")
    print(f"mesh              {dict(mesh.shape)}")
    print(f"parameters        {params:,}")
    print(f"batch             {config.train.batch_size}")
    print(f"step time         {step_time * 1e3:.1f} ms (median of {args.steps})")
    print(f"images/s          {config.train.batch_size / step_time:.1f}")
    print(f"FLOPs/step (XLA)  {flops / 1e9:.2f} GFLOP")
    print(f"achieved          {achieved / 1e9:.1f} GFLOP/s")
    print(f"f32 matmul peak   {peak / 1e9:.1f} GFLOP/s (2048^3 matmul, same run)")
    print(f"ratio             {achieved / peak:.1%}")
    print(f"TFLOP/s per device {achieved / mesh.size / 1e12:.4f}")
    print(f"MFU               {achieved / mesh.size / device_peak:.1%} of {peak_source}")
    print(f"compute dtype     {config.train.compute_dtype}; remat {config.train.remat}; "
          f"grad_accum_steps {config.train.grad_accum_steps}")  # fmt: skip
    print(f"state per device  {state_bytes / 2**20:.1f} MiB (params, EMA, optimizer)")
    print(f"step memory       {per_device / 2**20:.1f} MiB per device (XLA memory analysis)")


if __name__ == "__main__":
    main()
