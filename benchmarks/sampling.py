"""Sampler overhead: the time of a K-step guided sample over K times one guided network
call (its network calls for Heun: 2K - 1), for each sampler. 1.00 means the loop adds
nothing to the network's own time; the goal is <= 1.05.

  python benchmarks/sampling.py [--config experiments/diffusion_shapes.py:demo]
      [--steps 10,50] [--samplers ddim,dpmpp_2m,heun] [--batch 8] [--guidance 3]
      [--repeats 5] [--config.KEY=VALUE ...]

Random weights of the config's networks (the time does not depend on their values) on
the devices of this machine; the text side is built as a run builds it, from the config's
data set (prepared on first use). One guided call is the sampler's own `denoise` (the
method's `guided_denoiser`: a network pass over a batch of 2B) on encoded prompts,
compiled alone; a sample is `method.sample` compiled for K steps, so it also encodes the
prompts once, draws x_T and clips the result. Medians of `--repeats` timed runs after a warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from t2i_jax import config as config_lib
from t2i_jax.cli import _split_config_overrides
from t2i_jax.data import sources
from t2i_jax.methods import registry
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext
from t2i_jax.train import throughput


def interleaved_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of each function over `repeats` rounds of one call of each (after a
    warm-up call that compiles them)."""
    times: tuple[list, list] = ([], [])
    for fn in (first, second):
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for fn, out in zip((first, second), times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def build_method(config):
    """(the config's method, its text side), built as a run builds them, from the config's
    data set (prepared on first use), in a temporary workdir."""
    builder = sources.prepare(config.data.name, config.data.dir, config.data.variant)
    with tempfile.TemporaryDirectory() as workdir:
        text = build_text(config, TextContext(workdir, builder, config.seed))
    return registry.build_method(config, text), text


def network_calls(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/diffusion_shapes.py:demo")
    parser.add_argument("--steps", default="10,50", help="comma-separated K")
    parser.add_argument("--samplers", default="ddim,dpmpp_2m,heun")
    parser.add_argument("--batch", type=int, default=8, help="prompts per sample")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    argv, overrides = _split_config_overrides(sys.argv[1:])
    args = parser.parse_args(argv)
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)

    peak, source = throughput.device_peak(jax.devices()[0])
    print(f"{platform.node()}: {jax.devices()[0].device_kind}, peak {peak / 1e9:.0f} GFLOP/s "
          f"({source})")  # fmt: skip
    method, text = build_method(config)
    frozen = method.load_frozen()
    length = config.text.max_len
    tokens = jax.random.randint(jax.random.key(0), (args.batch, length), 3, text.vocab_size)
    captions = {"tokens": tokens, "mask": jnp.ones((args.batch, length), bool)}
    shapes = {"image": jnp.zeros((args.batch, *method.sample_shape)), **captions}
    params = jax.jit(method.init)(jax.random.key(0), shapes, frozen).ema_params

    feats = jax.jit(lambda p: method.guided_features(p, captions, frozen, args.guidance))(params)

    @jax.jit
    def one_call(params, feats, x_t, t, ab):
        return method.guided_denoiser(params, feats, args.guidance)(x_t, t, ab)

    x_t = jax.random.normal(jax.random.key(1), (args.batch, *method.sample_shape))
    t, ab = jnp.full((args.batch,), 500.0), jnp.full((args.batch,), 0.5)

    def call():
        return one_call(params, feats, x_t, t, ab)

    # This machine's speed drifts: each ratio's two times are measured in turn, round by
    # round, and each is the median of its rounds.
    print("sampler   K  calls  call (ms)  sample (s)  overhead")
    for sampler in args.samplers.split(","):
        for steps in (int(k) for k in args.steps.split(",")):
            sample = jax.jit(lambda p, k, s=sampler, n=steps: method.sample(
                p, captions, k, frozen, guidance=args.guidance, steps=n, sampler=s))  # fmt: skip
            call_s, sample_s = interleaved_medians(
                call, lambda f=sample: f(params, jax.random.key(2)), args.repeats
            )
            calls = network_calls(sampler, steps)
            overhead = sample_s / (calls * call_s)
            print(f"{sampler:9s} {steps:2d} {calls:6d} {call_s * 1e3:10.1f} {sample_s:11.3f} "
                  f"{overhead:9.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
