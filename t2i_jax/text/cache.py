"""Features of a frozen text encoder, computed once per data set split and read memory-mapped.

A frozen encoder gives the same features for a caption at every step, so training reads
them from disk instead of running the encoder. The cache lives under the data set's
directory, `<data>/text_features/<split>-<key>/`, where the key hashes everything that
decides the features: the encoder's name and module, its weights' digest, the tokenizer's
digest, the caption length and the data set's full name. A change of any of them gives a
new key, hence a new cache; an old one is left for the runs that use it.

Files (numpy `.npy`, opened with mmap): `index.npy` int32 [N] (example -> row), `pooled.npy`
float32 [U, D] and, for encoders with a sequence, `seq.npy` float32 [U, L, D], with one row
per distinct caption (templated captions repeat), and `meta.json`. The cache is written in
a temporary directory that is renamed into place only when complete, so a run killed
mid-write leaves no cache that looks whole; the next run removes the leftover and starts over.
Builds of one cache are serialised by a lock file beside it (runs sharing a data directory).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence

import jax
import numpy as np

from t2i_jax.batching import pad_to
from t2i_jax.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# (tokens int32 [B, L], mask bool [B, L]) -> {"pooled": [B, D], "seq": [B, L, D] (optional)}
EncodeFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def cache_key(*parts: str) -> str:
    """A short hex key over the parts (each part is a string that decides the features)."""
    h = hashlib.sha256()
    for part in (f"format {FORMAT_VERSION}", *parts):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:20]


class FeatureCache:
    """Read-only view of a complete cache directory; arrays open lazily (mmap).

    Picklable (grain workers get a copy): the memory maps are reopened in each process.
    """

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, "meta.json")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"text feature cache {directory} is unreadable: {e}") from e
        self.directory = directory
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self):
        return {"directory": self.directory, "meta": self.meta, "_arrays": None}

    @property
    def num_examples(self) -> int:
        return int(self.meta["num_examples"])

    @property
    def has_seq(self) -> bool:
        return bool(self.meta["has_seq"])

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            names = ("index", "pooled", "seq") if self.has_seq else ("index", "pooled")
            try:
                self._arrays = {
                    n: np.load(os.path.join(self.directory, f"{n}.npy"), mmap_mode="r")
                    for n in names
                }
            except (OSError, ValueError) as e:
                raise DataError(f"text feature cache {self.directory} is unreadable: {e}") from e
        return self._arrays

    def example_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes and dtypes `features` gives per example (the batch's extra entries)."""
        arrays = self._open()
        spec = {"text_pooled": arrays["pooled"]}
        if self.has_seq:
            spec["text_seq"] = arrays["seq"]
        return {k: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for k, a in spec.items()}

    def features(self, index: int) -> dict[str, np.ndarray]:
        """{"text_pooled": [D], "text_seq": [L, D] if the encoder has a sequence} of example."""
        arrays = self._open()
        row = int(arrays["index"][index])
        out = {"text_pooled": np.array(arrays["pooled"][row])}
        if self.has_seq:
            out["text_seq"] = np.array(arrays["seq"][row])
        return out


def _write(
    tmp: str,
    captions: Sequence[str],
    tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]],
    encode: EncodeFn,
    batch_size: int,
    meta: dict,
) -> None:
    """Encodes the distinct captions in fixed-size batches into memory-mapped files."""
    rows: dict[str, int] = {}
    index = np.fromiter((rows.setdefault(c, len(rows)) for c in captions), np.int32, len(captions))
    unique = list(rows)
    np.save(os.path.join(tmp, "index.npy"), index)
    files: dict[str, np.ndarray] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        # Padded with the last caption's rows: a fixed batch shape, one compilation.
        (tokens, mask), _ = pad_to(tokenize(chunk), batch_size, fill="edge")
        out = encode(tokens, mask)
        if not files:
            meta["has_seq"] = out.get("seq") is not None
            for name in ("pooled", "seq") if meta["has_seq"] else ("pooled",):
                files[name] = np.lib.format.open_memmap(
                    os.path.join(tmp, f"{name}.npy"),
                    mode="w+",
                    dtype=np.float32,
                    shape=(len(unique),) + out[name].shape[1:],
                )
        for name, array in files.items():
            array[start : start + len(chunk)] = np.asarray(out[name], np.float32)[: len(chunk)]
    for array in files.values():
        array.flush()
    meta.update(num_examples=len(captions), num_unique=len(unique))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def open_or_build(
    root: str,
    split: str,
    key: str,
    captions: Callable[[], Sequence[str]],
    tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]],
    encode: EncodeFn,
    *,
    batch_size: int = 128,
) -> FeatureCache:
    """The cache of `split` under `root` for `key`, built (on process 0) when missing.

    Args:
      root: directory holding caches (`<data dir>/text_features`).
      split: data set split, part of the directory name.
      key: `cache_key(...)` of everything that decides the features.
      captions: returns the split's captions in example order (called only to build).
      tokenize: captions -> (tokens, mask) as the pipeline tokenizes them.
      encode: the frozen encoder on a batch, see `EncodeFn`.
      batch_size: captions per encoder call.
    """
    name = f"{split}-{key}"
    final = os.path.join(root, name)
    if jax.process_index() == 0 and not os.path.isdir(final):
        os.makedirs(root, exist_ok=True)
        # Runs sharing a data directory build one cache at a time: the second waits for
        # the first, then finds the cache complete.
        with open(os.path.join(root, f".{name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isdir(final):
                for leftover in glob.glob(os.path.join(root, f".{name}.tmp-*")):
                    shutil.rmtree(leftover, ignore_errors=True)  # A killed build's.
                tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
                os.makedirs(tmp)
                texts = list(captions())
                log.info("caching text features of %d %s captions in %s", len(texts), split, final)
                _write(tmp, texts, tokenize, encode, batch_size, {"key": key, "split": split})
                os.replace(tmp, final)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"text features {final}")
    return FeatureCache(final)
