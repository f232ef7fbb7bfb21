"""The tasks `t2i data import` runs in its worker processes: decode a chunk of files or a
whole tar shard, write the images to a staging file, report what was skipped and why.

Only numpy and Pillow are imported here, so spawned workers start in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from t2i_jax.data import image_decode, import_sources
from t2i_jax.errors import UserError, writing


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    """How images become records (all of it recorded in the report)."""

    image_size: int = 64
    crop: str = "center"
    min_size: int = 16
    validation_fraction: float = 0.05
    seed: int = 0

    def check(self) -> None:
        if self.image_size < 8:
            raise UserError(f"--image-size must be at least 8, got {self.image_size}")
        if self.crop not in image_decode.CROPS:
            raise UserError(f"--crop must be one of {image_decode.CROPS}, got {self.crop!r}")
        if self.min_size < 1:
            raise UserError(f"--min-size must be at least 1, got {self.min_size}")
        if not 0.0 <= self.validation_fraction <= 0.5:
            raise UserError(
                f"--validation-fraction must be in [0, 0.5], got {self.validation_fraction}"
            )


@dataclasses.dataclass
class TaskResult:
    """One task's decoded records (in a staging .npz) and its skipped keys by reason."""

    index: int
    staging: str | None
    count: int
    listed: int
    skipped: list[tuple[str, str]]  # (key, reason)
    captions_skipped: list[tuple[str, str]]  # COCO: one bad caption of a kept image


def _save_staging(path: str, images: list, meta: list) -> str | None:
    if not images:
        return None
    with writing(path):
        np.savez(path, images=np.stack(images), meta=np.asarray(json.dumps(meta)))
    return path


def _decode_one(key, data, raw_captions, options: ImportOptions):
    """(image, captions, None, bad captions) or (None, None, reason, bad captions)."""
    captions, bad = [], []
    for raw in raw_captions:
        text, reason = image_decode.decode_caption(raw)
        if text is None:
            bad.append(reason)
        else:
            captions.append(text)
    if not captions:
        return None, None, bad[0], []
    image, reason = image_decode.decode_image(
        data,
        size=options.image_size,
        crop=options.crop,
        seed=image_decode.key_seed(options.seed, key),
        min_size=options.min_size,
    )
    if image is None:
        return None, None, reason, []
    return image, captions, None, bad


def decode_files(task) -> TaskResult:
    index, items, validation, options, staging = task
    images, meta, skipped, bad_captions = [], [], [], []
    for item in items:
        try:
            with open(item.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            skipped.append((item.key, "missing_file"))
            continue
        except OSError:
            skipped.append((item.key, image_decode.UNREADABLE))
            continue
        image, captions, reason, bad = _decode_one(item.key, data, item.captions, options)
        bad_captions += [(item.key, r) for r in bad]
        if image is None:
            skipped.append((item.key, reason))
            continue
        images.append(image)
        split = "validation" if item.key in validation else "train"
        meta.append({"key": item.key, "captions": captions, "split": split})
    path = _save_staging(os.path.join(staging, f"task{index:06d}.npz"), images, meta)
    return TaskResult(index, path, len(images), len(items), skipped, bad_captions)


def decode_shard(task) -> TaskResult:
    index, shard, prefix, validation, options, staging = task
    images, meta, skipped, listed = [], [], [], 0
    for sample in import_sources.iter_shard(shard):
        key = f"{prefix}/{sample.key}"
        listed += 1
        reason = import_sources.reason_of_sample(sample)
        if reason is not None:
            skipped.append((key, reason))
            continue
        image, captions, reason, _ = _decode_one(
            key, import_sources.sample_image(sample), [import_sources.sample_caption(sample)],
            options,
        )  # fmt: skip
        if image is None:
            skipped.append((key, reason))
            continue
        images.append(image)
        split = "validation" if key in validation else "train"
        meta.append({"key": key, "captions": captions, "split": split})
    path = _save_staging(os.path.join(staging, f"task{index:06d}.npz"), images, meta)
    return TaskResult(index, path, len(images), listed, skipped, [])


def list_shard_keys(task) -> list[str]:
    prefix, shard = task
    return [f"{prefix}/{k}" for k in import_sources.shard_keys(shard)]
