"""`t2i data import`: a user's captioned images -> a TFDS data set any run can train on.

    t2i data import ~/my_images --name my_images --format folder --image-size 64
    t2i train --config experiments/images.py:diffusion-full --config.data.name=my_images

Steps: list the source (`import_sources.py`, no image read); give each listed image a split
(a seeded hash order of the keys: the first round(F * N) are `validation`); decode in worker
processes, a chunk of files or a whole shard per task (`image_decode.py`), each task writing
its images to a staging file; write the records in listing order (`record_writer.py`), the
metadata and `import_report.json`. Everything is built in `DATA_DIR/.NAME.import/` and
renamed to `DATA_DIR/NAME/` at the end, so an interrupted import leaves nothing a run would
read, and the next import starts over. The same source and options give identical files.
`t2i data import` then trains the tokenizer on the training captions.

Records: {"image": uint8[S, S, 3], "caption": str (the first), "key": str} and, for COCO,
"captions": every caption of the image (runs draw one per step, `train/input_pipeline.py`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from t2i_jax.data import import_sources, import_workers, integrity, record_writer
from t2i_jax.data.import_workers import ImportOptions
from t2i_jax.errors import UserError, writing

SPLITS = ("train", "validation")
FILES_PER_TASK = 64
REPORT_FILE = "import_report.json"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
EXAMPLES_PER_REASON = 10  # keys listed per skip reason in the report


def features(size: int, several_captions: bool) -> tfds.features.FeaturesDict:
    spec = {
        "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
        "caption": tfds.features.Text(),
        "key": tfds.features.Text(),
    }
    if several_captions:
        spec["captions"] = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict(spec)


def validation_keys(keys: Sequence[str], fraction: float, seed: int) -> set[str]:
    """round(fraction * N) keys (at least one when fraction > 0 and N > 1), first in the
    order of sha256(seed:key): a split that does not depend on listing order or workers."""
    count = round(fraction * len(keys))
    if fraction > 0 and len(keys) > 1:
        count = max(count, 1)
    order = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return set(order[:count])


def _map(fn: Callable, tasks: list, workers: int) -> Iterator:
    """fn over tasks in order: in worker processes (spawned: no inherited JAX state), or
    here when workers == 0."""
    if workers == 0:
        yield from map(fn, tasks)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(fn, tasks)


# -- the import ----------------------------------------------------------------------------
def _tasks(fmt, src, options, staging, caption_column, image_dir, workers, progress):
    """(task function, tasks, number of listed images, several captions per image)."""
    if fmt == "webdataset":
        shards = import_sources.list_shards(src)
        # Keys are SHARD/KEY, the shard named relative to the source folder.
        root = src if os.path.isdir(src) else os.path.dirname(os.path.commonpath(shards))
        prefixes = [os.path.relpath(s, root).replace(os.sep, "/") for s in shards]
        listing = list(zip(prefixes, shards, strict=True))
        keys = [
            k
            for part in tqdm(
                _map(import_workers.list_shard_keys, listing, workers),
                total=len(shards),
                desc="listing shards",
                disable=not progress,
            )
            for k in part
        ]
        validation = validation_keys(keys, options.validation_fraction, options.seed)
        tasks = [
            (i, shard, prefix, {k for k in validation if k.startswith(prefix + "/")}, options,
             staging)
            for i, (shard, prefix) in enumerate(zip(shards, prefixes, strict=True))
        ]  # fmt: skip
        return import_workers.decode_shard, tasks, len(keys), False
    if fmt == "folder":
        items = import_sources.list_folder(src, caption_column)
    else:
        items = import_sources.list_coco(src, image_dir)
    validation = validation_keys([i.key for i in items], options.validation_fraction, options.seed)
    chunks = [items[i : i + FILES_PER_TASK] for i in range(0, len(items), FILES_PER_TASK)]
    tasks = [
        (i, chunk, {it.key for it in chunk if it.key in validation}, options, staging)
        for i, chunk in enumerate(chunks)
    ]
    return import_workers.decode_files, tasks, len(items), fmt == "coco"


def check_name(name: str) -> None:
    from t2i_jax.data.datasets import DATASETS

    if not NAME_PATTERN.match(name):
        raise UserError(f"--name {name!r}: use lowercase letters, digits and _ (a-z first)")
    if name in DATASETS:
        raise UserError(f"--name {name!r} is a built-in data set; choose another name")


def import_data_set(
    src: str,
    *,
    name: str,
    fmt: str,
    data_dir: str = "data",
    options: ImportOptions | None = None,
    caption_column: str | None = None,
    image_dir: str | None = None,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Imports `src` as data set `name` under `data_dir`; returns the import report."""
    check_name(name)
    options = options or ImportOptions()
    options.check()
    if fmt not in import_sources.FORMATS:
        raise UserError(f"--format must be one of {import_sources.FORMATS}, got {fmt!r}")
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    final = os.path.join(data_dir, name)
    if os.path.exists(final) and not overwrite:
        raise UserError(f"{final} already exists; pass --overwrite to replace it")
    work = os.path.join(data_dir, f".{name}.import")
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted import left
    staging, folder = os.path.join(work, "staging"), os.path.join(work, name)
    made_data_dir = not os.path.exists(data_dir)
    with writing(work):
        os.makedirs(staging)
        os.makedirs(folder)
    try:
        # Its writes (staging, records) fail as one WriteError line; reads of the source
        # as theirs. Nothing is put in place unless all of it is written.
        report = _build(
            src, name, fmt, folder, staging, options, caption_column, image_dir, workers,
            progress,
        )  # fmt: skip
        with writing(work):
            shutil.rmtree(staging)
            integrity.record(folder)  # sizes and checksums, checked at every load
            if os.path.exists(final):  # --overwrite: swap, then drop the old one
                old = os.path.join(work, "old")
                os.replace(final, old)
            os.replace(folder, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made_data_dir and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)  # a failed first import leaves no trace
    _print_summary(name, final, report)
    return report


def _build(src, name, fmt, folder, staging, options, caption_column, image_dir, workers, progress):
    fn, tasks, listed, several = _tasks(
        fmt, src, options, staging, caption_column, image_dir, workers, progress
    )
    spec = features(options.image_size, several)
    writers = {s: record_writer.SplitWriter(folder, name, s, spec) for s in SPLITS}
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    captions_skipped: dict[str, int] = collections.Counter()
    bar = tqdm(total=listed, desc=f"importing {name}", unit="img", disable=not progress)
    for result in _map(fn, tasks, workers):
        for key, reason in result.skipped:
            skipped[reason].append(key)
        for _, reason in result.captions_skipped:
            captions_skipped[reason] += 1
        if result.staging is not None:
            with np.load(result.staging) as staged:
                images, meta = staged["images"], json.loads(str(staged["meta"]))
            for image, m in zip(images, meta, strict=True):
                record = {"image": image, "caption": m["captions"][0], "key": m["key"]}
                if several:
                    record["captions"] = m["captions"]
                writers[m["split"]].write(record)
            os.remove(result.staging)
        bar.update(result.listed)
    bar.close()
    split_infos = [writers[s].finish() for s in SPLITS]
    counts = {info.name: info.num_examples for info in split_infos}
    if counts["train"] == 0:
        raise UserError(f"no image of {src} could be imported: {_reasons(skipped) or 'none'}")
    report = {
        "name": name,
        "source": os.path.abspath(src),
        "format": fmt,
        "options": dataclasses.asdict(options),
        "caption_column": caption_column,
        "listed": listed,
        "imported": sum(counts.values()),
        "splits": counts,
        "skipped": {r: len(k) for r, k in sorted(skipped.items())},
        "skipped_keys": {r: sorted(k)[:EXAMPLES_PER_REASON] for r, k in sorted(skipped.items())},
        "captions_skipped": dict(sorted(captions_skipped.items())),
    }
    record_writer.write_metadata(
        folder,
        name,
        spec,
        split_infos,
        description=f"Imported by `t2i data import` from {fmt} {os.path.abspath(src)}.",
    )
    with open(os.path.join(folder, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report


def _reasons(skipped: dict) -> str:
    return ", ".join(
        f"{r} {len(k) if isinstance(k, list) else k}" for r, k in sorted(skipped.items())
    )


def _print_summary(name: str, path: str, report: dict) -> None:
    skipped = sum(report["skipped"].values())
    detail = f" ({_reasons(report['skipped'])})" if skipped else ""
    print(
        f"imported {name}: {report['splits']['train']} train, "
        f"{report['splits']['validation']} validation of {report['listed']} listed; "
        f"skipped {skipped}{detail}; in {path}",
        flush=True,
    )
