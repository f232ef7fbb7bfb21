"""A training grid's sampling on a mesh of several devices: the rows split over the devices
(each samples its part; what `runs/sampling.sample_images` does) against the whole batch
on every device (what it did before), each timed in turn.

  python benchmarks/grid_sampling.py [--config experiments/diffusion_shapes.py:demo]
      [--repeats 3] [--config.KEY=VALUE ...]

The config's grid (its prompts x `sample.per_prompt`, its sampler and steps), random
weights (the time does not depend on their values), on the config's `mesh.cpu_devices`
CPU devices (GPUs: the machine's). Medians of `--repeats` timed rounds after a warm-up.
"""

from __future__ import annotations

import argparse
import platform
import sys

import jax
from sampling import build_method, interleaved_medians

from t2i_jax import config as config_lib
from t2i_jax import sharding
from t2i_jax.cli import _split_config_overrides
from t2i_jax.runs.sampling import make_sampler
from t2i_jax.train import multihost, throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/diffusion_shapes.py:demo")
    parser.add_argument("--repeats", type=int, default=3)
    argv, overrides = _split_config_overrides(sys.argv[1:])
    args = parser.parse_args(argv)
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    multihost.split_cpu(sharding.mesh_config(config).cpu_devices)  # before JAX's first use
    peak = throughput.measured_matmul_peak(2048)  # the whole CPU's, all devices together
    mesh = sharding.make_mesh()
    print(f"{platform.node()}: {len(jax.devices())} x {jax.devices()[0].device_kind}, "
          f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s")  # fmt: skip
    method, text = build_method(config)
    frozen = jax.device_put(method.load_frozen(), sharding.replicated(mesh))
    captions = [p for p in config.sample.prompts for _ in range(config.sample.per_prompt)]
    tokens, mask = text.tokenizer.encode(captions, config.text.max_len)
    shapes = {"image": jax.numpy.zeros((len(captions), *method.sample_shape)),
              "tokens": tokens, "mask": mask}  # fmt: skip
    params = jax.jit(method.init)(jax.random.key(0), shapes, frozen).ema_params
    params = jax.device_put(params, sharding.replicated(mesh))
    sampler = make_sampler(method)
    key = jax.random.key(0)
    rows = {"tokens": tokens, "mask": mask}
    split = sharding.put_global(rows, sharding.rows_sharding(mesh, len(captions)))
    whole = sharding.put_global(rows, sharding.replicated(mesh))
    split_s, whole_s = interleaved_medians(
        lambda: sampler(params, split, key, frozen),
        lambda: sampler(params, whole, key, frozen),
        args.repeats,
    )
    print(f"grid of {len(captions)} on {mesh.devices.size} devices: rows split {split_s:.2f} s, "
          f"whole on each {whole_s:.2f} s ({split_s / whole_s:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
