"""Metric speed against the reference implementations, same machine, same run.

  python benchmarks/metrics_speed.py [--fid-batch 50] [--fid-size 64] [--ssim-batch 32]
      [--ssim-size 256] [--repeats 5]

FID feature extraction (resize to 299, Inception pool3) here vs pytorch-fid's InceptionV3;
SSIM here vs torchmetrics' structural_similarity_index_measure (both 11-tap Gaussian,
sigma 1.5). Both networks get random weights: speed does not depend on their values, and
the published FID weights cannot be downloaded everywhere. Medians over `repeats` calls
after one warm-up call (which includes compilation here). Needs the `test` extra (torch).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from unittest import mock

import jax
import numpy as np
import torch
import torchvision
from pytorch_fid import inception as pytorch_fid_inception
from torchmetrics.functional.image import structural_similarity_index_measure

from t2i_jax.metrics import fid, pixel


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: compilation (JAX) or allocator warm-up (torch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def pytorch_fid_model() -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (FID blocks, resize and 2x-1 inside), random weights."""
    with (
        mock.patch.object(torchvision.models.inception.Inception3, "load_state_dict"),
        mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", return_value={}),
    ):
        model = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
    return model.eval()


def bench_fid(batch: int, size: int, repeats: int) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    ours = fid.load_fid_inception(random_seed=0)
    ours_s = median_seconds(lambda: ours(images), repeats)

    model = pytorch_fid_model()
    as_torch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    def reference():
        with torch.no_grad():
            return model(as_torch)[0].numpy()

    ref_s = median_seconds(reference, repeats)
    return {"ours_s": ours_s, "ref_s": ref_s, "images": batch}


def bench_ssim(batch: int, size: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.float32)
    ssim = jax.jit(lambda a, b: pixel.ssim(a, b, data_range=255.0))
    xj, yj = jax.device_put(x), jax.device_put(y)
    ours_s = median_seconds(lambda: ssim(xj, yj).block_until_ready(), repeats)

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y).permute(0, 3, 1, 2).contiguous()

    def reference():
        return structural_similarity_index_measure(xt, yt, data_range=255.0, reduction="none")

    ref_s = median_seconds(reference, repeats)
    return {"ours_s": ours_s, "ref_s": ref_s, "images": batch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fid-batch", type=int, default=50)
    parser.add_argument("--fid-size", type=int, default=64)
    parser.add_argument("--ssim-batch", type=int, default=32)
    parser.add_argument("--ssim-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device); "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    rows = [
        (
            f"FID features, {args.fid_batch} images {args.fid_size}x{args.fid_size} -> 299",
            bench_fid(args.fid_batch, args.fid_size, args.repeats),
            "pytorch-fid InceptionV3",
        ),
        (
            f"SSIM, {args.ssim_batch} pairs {args.ssim_size}x{args.ssim_size}x3",
            bench_ssim(args.ssim_batch, args.ssim_size, args.repeats),
            "torchmetrics SSIM",
        ),
    ]
    print("| measure | t2i_jax | reference | reference time | images/s (t2i_jax) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, r, ref_name in rows:
        print(
            f"| {name} | {1e3 * r['ours_s']:.1f} ms | {ref_name} | {1e3 * r['ref_s']:.1f} ms "
            f"| {r['images'] / r['ours_s']:.1f} | {r['ref_s'] / r['ours_s']:.2f}x |"
        )
    print("ratio = reference time / t2i_jax time (above 1: t2i_jax is faster)")


if __name__ == "__main__":
    main()
