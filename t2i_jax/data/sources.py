"""Opening a registered data set: prepare its TFDS files once, then random access.

A data set is a TFDS builder writing array_record files (no TensorFlow needed). Its
SentencePiece tokenizer (text/tokenizer.py) is trained on the training captions and kept
beside the data.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
import tensorflow_datasets as tfds

from t2i_jax.data import integrity
from t2i_jax.data.datasets import (
    DATASETS,
    PUBLIC_DATASETS,
    builder_class,
    check_name,
    imported_path,
)
from t2i_jax.data.public import PublicDataSet
from t2i_jax.errors import DataError


def decode_caption(raw: str | bytes | np.ndarray, where: str) -> str:
    """Returns the caption as str; a non-UTF-8 or empty caption is the data's error."""
    if isinstance(raw, np.ndarray):
        raw = raw.item()
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"caption is not valid UTF-8 at {where}: {e}") from None
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"empty caption at {where}")
    return raw


def load_builder(name: str, data_dir: str, variant: str) -> tfds.core.DatasetBuilder:
    """The built-in data set `name`, a public TFDS one, or the one imported under
    `data_dir/name`; a built or imported one is checked against its manifest
    (data/integrity.py)."""
    if name in PUBLIC_DATASETS:
        return PublicDataSet(name, data_dir, variant)
    if name not in DATASETS:
        check_name(name, data_dir)
        path = imported_path(name, data_dir)
        if variant != "default":
            raise DataError(f"imported data set {name} has no variant {variant!r} (only default)")
        if integrity.has_manifest(path):  # before TFDS reads its (maybe damaged) metadata
            integrity.verify(path, name, _rebuild_imported(name, data_dir))
        try:
            return tfds.builder_from_directory(path)
        except Exception as e:  # noqa: BLE001 - TFDS raises many kinds on bad metadata
            raise DataError(f"cannot open imported data set {path}: {e}") from None
    builder_cls = builder_class(name)
    try:
        builder = builder_cls(
            data_dir=os.path.expanduser(data_dir), config=variant, file_format="array_record"
        )
    except ValueError as e:  # TFDS raises ValueError for an unknown builder config.
        raise DataError(f"data set {name}: {e}") from None
    if integrity.has_manifest(builder.data_dir):  # only a prepared folder has one
        rebuild = (
            f"delete {builder.data_dir} to have it built again on the next run (or `t2i data "
            f"prepare {name} --data-dir {data_dir} --variant {variant}`)"
        )
        integrity.verify(builder.data_dir, name, rebuild)
    return builder


def prepare(name: str, data_dir: str, variant: str) -> tfds.core.DatasetBuilder:
    """Builds the data set on first use (on process 0) and returns its builder."""
    builder = load_builder(name, data_dir, variant)
    if isinstance(builder, PublicDataSet):  # prepared by the user with TFDS
        return builder.prepare()
    if name not in DATASETS:  # imported: prepared by `t2i data import`
        return builder
    was_prepared = builder.is_prepared()
    if jax.process_index() == 0:
        if not was_prepared:
            tfds.display_progress_bar(False)  # Builds take seconds; keep logs readable.
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False,  # Built-in sets are made here; never reach out.
                )
            )
            integrity.record(builder.data_dir)
        elif not integrity.has_manifest(builder.data_dir):  # prepared before manifests
            with contextlib.suppress(OSError):  # a read-only copy is checked by TFDS alone
                integrity.record(builder.data_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"prepare {name}")
    return builder if was_prepared else load_builder(name, data_dir, variant)


def _rebuild_imported(name: str, data_dir: str) -> str:
    return f"import it again: t2i data import SRC --name {name} --data-dir {data_dir} --overwrite"


def prepare_for_run(data) -> tfds.core.DatasetBuilder:
    """`prepare` for a run's `data` config section, whose `image_size` must be the data
    set's: a mismatch is one line here rather than a shape error inside the compiled step."""
    builder = prepare(data.name, data.dir, data.variant)
    shape = tuple(builder.info.features["image"].shape)
    if shape[:2] != (data.image_size, data.image_size):
        raise DataError(
            f"data set {data.name} ({data.variant}) has {shape[0]}x{shape[1]} images, the "
            f"config has data.image_size={data.image_size}"
            + (
                f" (set data.variant={data.image_size}x{data.image_size})"
                if isinstance(builder, PublicDataSet)
                else ""
            )
        )
    return builder


def has_several_captions(builder: tfds.core.DatasetBuilder) -> bool:
    """Records carry every caption of their image ("captions"); runs draw one per step."""
    return "captions" in builder.info.features


def split_captions(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
    """Every caption of `split`, in record order (all of an image's, where it has several)."""
    source = builder.as_data_source(split)
    key = "captions" if has_several_captions(builder) else "caption"
    out = []
    for i in range(len(source)):
        raw = source[i][key]
        for caption in raw if key == "captions" else [raw]:
            out.append(decode_caption(caption, f"{builder.name} {split}[{i}]"))
    return out


def first_captions(builder: tfds.core.DatasetBuilder, num: int) -> list[str]:
    """The first captions of `validation` (of `train` when it has none): default prompts."""
    split = "validation" if builder.info.splits["validation"].num_examples else "train"
    source = builder.as_data_source(split)
    return [
        decode_caption(source[i]["caption"], f"{builder.name} {split}[{i}]")
        for i in range(min(num, len(source)))
    ]


def training_captions(builder: tfds.core.DatasetBuilder) -> list[str]:
    """What the tokenizer is trained on; a public set gives them without decoding images."""
    if isinstance(builder, PublicDataSet):
        return builder.training_captions()
    return split_captions(builder, "train")
