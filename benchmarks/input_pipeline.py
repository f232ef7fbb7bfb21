"""Loader throughput on an imported JPEG data set, beside the train step it feeds.

  python benchmarks/input_pipeline.py [--images 512] [--sizes 32,64,256] [--workers 0,1,2]
      [--batches 30] [--steps 5]

Writes `--images` JPEG photographs (random crops of scikit-image's sample photos, 320-640 px
a side) with captions into a temporary folder, imports it with `t2i data import` at each
size, then measures for each size:

- import: images/s of `t2i data import` (decode, resize, crop, write; 2 workers);
- loader: images/s of the training loader (grain: record reads, random flip, tokenizing,
  batching) with 0, 1 and 2 worker processes, median over `--batches` batches after the
  first few;
- train step: images/s of the matching `experiments/images.py` config's compiled step on
  random batches (`train_step.measure`): demo at 32 px, full at 64 px (diffusion) and at
  256 px (the latent diffusion VAE, `ldm_vae`), at the config's batch or `--step-batch`;
  the loader is measured at the same batch;
- headroom: loader images/s over train-step images/s (the goal: >= 10x at demo sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import skimage.data
from PIL import Image
from train_step import measure

from t2i_jax import cli, rng
from t2i_jax import config as config_lib
from t2i_jax.data import sources
from t2i_jax.text.tokenizer import prepare_tokenizer
from t2i_jax.train import input_pipeline, throughput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {32: "diffusion-demo", 64: "diffusion-full", 256: "ldm_vae-full"}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
WORDS = ("red", "small", "bright", "old", "blurry", "close", "distant", "dark")


def write_jpegs(folder: str, count: int, seed: int = 0) -> None:
    """`count` JPEG crops of scikit-image's photos with metadata.jsonl captions."""
    gen = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    os.makedirs(folder)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(count):
            k = int(gen.integers(len(photos)))
            photo = photos[k]
            h, w = photo.shape[:2]
            ch, cw = int(gen.integers(h // 2, h + 1)), int(gen.integers(w // 2, w + 1))
            top, left = int(gen.integers(h - ch + 1)), int(gen.integers(w - cw + 1))
            crop = Image.fromarray(photo[top : top + ch, left : left + cw])
            side = int(gen.integers(320, 641))
            crop = crop.resize((side, max(16, side * ch // cw)), Image.BICUBIC)
            name = f"{i:05d}.jpg"
            crop.save(os.path.join(folder, name), quality=90)
            words = " ".join(gen.choice(WORDS, 2, replace=False))
            f.write(json.dumps({"file_name": name, "text": f"a {words} {PHOTOS[k]} photo"}))
            f.write("\n")


def loader_images_per_second(
    source, tokenizer, *, batch: int, max_len: int, workers: int, batches: int
) -> float:
    loader = input_pipeline.make_loader(
        source,
        tokenizer,
        global_batch_size=batch,
        max_len=max_len,
        seed=rng.stream_seed(0, "data"),
        worker_count=workers,
        shard_index=0,
        shard_count=1,
        random_flip=True,
    )
    warmup = 3 + 2 * workers  # worker start-up is not throughput
    times, last = [], None
    for i, _ in enumerate(loader):
        now = time.perf_counter()
        if i >= warmup:
            times.append(now - last)
        last = now
        if len(times) == batches:
            break
    return batch / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--sizes", default="32,64,256")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5, help="train steps timed per size")
    parser.add_argument(
        "--step-batch",
        type=int,
        help="cap on the train step's batch (the full configs' 128 need tens of GB on a CPU); "
        "images/s are reported at the batch used",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    peak = throughput.measured_matmul_peak(n=2048, repeats=10)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; f32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src, data_dir = os.path.join(tmp, "jpegs"), os.path.join(tmp, "data")
        start = time.perf_counter()
        write_jpegs(src, args.images)
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
        for size in sizes:
            name = f"bench{size}"
            start = time.perf_counter()
            code = cli.main(["data", "import", src, "--name", name, "--format", "folder",
                             "--data-dir", data_dir, "--image-size", str(size),
                             "--workers", "2", "--no-progress"])  # fmt: skip
            if code:
                sys.exit(code)
            import_rate = args.images / (time.perf_counter() - start)
            config = config_lib.load_config(f"{REPO}/experiments/images.py:{CONFIGS[size]}")
            overrides = [f"data.name={name}", f"data.dir={data_dir}"]
            if args.step_batch and args.step_batch < config.train.batch_size:
                overrides.append(f"train.batch_size={args.step_batch}")
            config_lib.apply_overrides(config, overrides)
            builder = sources.load_builder(name, data_dir, "default")
            tokenizer = prepare_tokenizer(builder, config.text.vocab_size)
            source = builder.as_data_source("train")
            loader = {
                w: loader_images_per_second(
                    source,
                    tokenizer,
                    batch=config.train.batch_size,
                    max_len=config.text.max_len,
                    workers=w,
                    batches=args.batches,
                )  # fmt: skip
                for w in workers
            }
            step = config.train.batch_size / measure(config, args.steps)["step_time"]
            rows.append((size, CONFIGS[size], config.train.batch_size, import_rate, loader, step))
            print(f"{size} px: import {import_rate:.0f} images/s; loader "
                  + ", ".join(f"{w} workers {r:.0f}" for w, r in loader.items())
                  + f" images/s; train step ({CONFIGS[size]}, batch "
                  f"{config.train.batch_size}) {step:.1f} images/s", flush=True)  # fmt: skip
    peak_after = throughput.measured_matmul_peak(n=2048, repeats=10)
    print()
    header = (
        "| size | config | batch | import images/s | "
        + " | ".join(f"loader, {w} workers" for w in workers)
        + " | train step images/s | headroom (best loader / step) |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size, name, batch, import_rate, loader, step in rows:
        cells = " | ".join(f"{loader[w]:.0f}" for w in workers)
        print(f"| {size} | `images.py:{name}` | {batch} | {import_rate:.0f} | {cells} | "
              f"{step:.1f} | {max(loader.values()) / step:.0f}x |")  # fmt: skip
    print(f"\nf32 matmul peak {peak / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} after")


if __name__ == "__main__":
    main()
