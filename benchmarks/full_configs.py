"""Every experiment's `full` variant (accelerator-sized) compiled on this machine without
data or weights: parameters, state, XLA's memory analysis and FLOPs per step, compile time.

  python benchmarks/full_configs.py [--devices 1] [--budget-gib 64] [EXPERIMENT.py ...]

What `t2i compile --config experiments/EXPERIMENT.py:full` prints, for all of them in one
table (train/preflight.py: the sharded step lowered and compiled for abstract inputs;
latent diffusion with a stand-in for its VAE run: the config.json of `vae_shapes.py:full`
made text-free). On a CPU the memory figures are XLA's CPU estimate of what one
accelerator needs (other fusions, no cuDNN workspaces), hence a 64 GiB budget for an
80 GB device rather than 80. Exits 1 if a variant does not fit the budget.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax

from t2i_jax import config as config_lib
from t2i_jax.train import preflight, throughput

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments")
FULL_EXPERIMENTS = (
    "diffusion_digits.py",
    "diffusion_shapes.py",
    "gan_shapes.py",
    "ldm_shapes.py",
    "vae_shapes.py",
    "vqvae_shapes.py",
)


def compile_full(experiment: str, devices, scratch: str):
    """(config, compiled step, seconds to lower and compile) of the experiment's full
    variant on `devices`."""
    config = config_lib.load_config(os.path.join(EXPERIMENTS_DIR, f"{experiment}:full"))
    config.data.dir = os.path.join(scratch, "data")  # t2i_shapes small, for the tokenizer
    if config.method == "ldm":
        vae = config_lib.load_config(os.path.join(EXPERIMENTS_DIR, "vae_shapes.py:full"))
        config.ldm.autoencoder = preflight.stand_in_autoencoder(vae, os.path.join(scratch, "vae"))
    workdir = os.path.join(scratch, experiment)
    os.makedirs(workdir)
    text = preflight.stand_in_text(config, workdir)
    start = time.perf_counter()
    step = preflight.compile_train_step(config, text, devices)
    return config, step, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", default=FULL_EXPERIMENTS)
    parser.add_argument("--devices", type=int, default=1, help="compile for the first N")
    parser.add_argument("--budget-gib", type=float, default=64.0)
    args = parser.parse_args()
    devices = jax.devices()[: args.devices]
    peak = throughput.measured_matmul_peak() if devices[0].platform == "cpu" else float("nan")
    print(f"# {platform.machine()} {devices[0].platform} x{len(devices)}, jax {jax.__version__}, "
          f"f32 matmul peak {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    print("| config | image size | batch | params | state | temporaries | peak | GFLOP/step | "
          "lower + compile (wall) |\n" + "|---" * 9 + "|")  # fmt: skip
    over = []
    with tempfile.TemporaryDirectory() as scratch:
        for experiment in args.experiments:
            config, step, seconds = compile_full(experiment, devices, scratch)
            sizes = (step.state_bytes, step.temp_bytes, step.peak_bytes)
            print(
                f"| `{experiment.removesuffix('.py')}:full` | {config.data.image_size} | "
                f"{config.train.batch_size} | {step.parameters / 1e6:.1f}M | "
                + " | ".join(preflight.format_bytes(n) for n in sizes)
                + f" | {step.flops / 1e9:,.0f} | {seconds:.1f} s |",
                flush=True,
            )
            if step.peak_bytes >= args.budget_gib * preflight.GiB:
                over.append(experiment)
    if over:
        print(f"over the {args.budget_gib:g} GiB budget: {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
