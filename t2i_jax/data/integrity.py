"""Data integrity: the files of a prepared data set, as they were, checked at every load.

Preparing a data set (a built-in build, `t2i data import`) ends by recording each record
shard's and TFDS metadata file's size and SHA-256 in `t2i_manifest.json` beside them.
Loading compares: a missing or resized file (a truncated copy, a partial sync) is caught
from its size; a file whose size is unchanged is hashed again only when it was modified
at or after the manifest was written, so an untouched data set costs one `stat` a file.
The manifest holds no times, so two imports of the same source stay byte-identical.
Anything else written into the folder later (the tokenizer, cached text features,
evaluators) is not part of the data and not recorded.
"""

from __future__ import annotations

import hashlib
import json
import os

from t2i_jax.errors import DataError

MANIFEST = "t2i_manifest.json"
METADATA_FILES = ("dataset_info.json", "features.json")


def data_files(folder: str) -> list[str]:
    """The files that make the data set: record shards and TFDS metadata."""
    return sorted(
        name
        for name in os.listdir(folder)
        if ".array_record-" in name or ".tfrecord-" in name or name in METADATA_FILES
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record(folder: str) -> None:
    """Writes the manifest of `folder`'s data files (atomically)."""
    files = {}
    for name in data_files(folder):
        path = os.path.join(folder, name)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, MANIFEST))


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def verify(folder: str, name: str, rebuild: str) -> None:
    """DataError (one line: which file, what changed, how to rebuild) unless every
    recorded file is there as it was. `rebuild` says how to make the data set again."""
    path = os.path.join(folder, MANIFEST)
    try:
        recorded_at = os.stat(path).st_mtime_ns
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {path} ({e}); {rebuild}") from e

    def changed(what: str) -> DataError:
        return DataError(f"data set {name} in {folder} changed after it was prepared: {what}; "
                         f"{rebuild}")  # fmt: skip

    for file, want in sorted(files.items()):
        file_path = os.path.join(folder, file)
        try:
            st = os.stat(file_path)
        except FileNotFoundError:
            raise changed(f"{file} is missing") from None
        if st.st_size != want["bytes"]:
            raise changed(f"{file} has {st.st_size} bytes, {want['bytes']} when prepared")
        if st.st_mtime_ns >= recorded_at and _sha256(file_path) != want["sha256"]:
            raise changed(f"{file}'s contents differ (SHA-256) from when it was prepared")
    extra = sorted(set(data_files(folder)) - set(files))
    if extra:
        raise changed(f"{extra[0]} was not part of it")
