"""grain input pipeline: TFDS records -> the batch contract (docs/architecture.md).

Batch: {"image": float32[B, H, W, 3] in [-1, 1], "tokens": int32[B, L], "mask": bool[B, L]},
plus "text_pooled" [B, D] (and "text_seq" [B, L, D]) when a frozen encoder's features are
read from its cache (`text/cache.py`).
Each JAX process reads its own shard of the records and yields its part of the global
batch; the order is a pure function of the run's seed, and the iterator's state is
saved in checkpoints so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import dataclasses

import grain.python as grain
import jax
import numpy as np
from absl import flags

from t2i_jax.data.sources import decode_caption
from t2i_jax.errors import ConfigError, DataError
from t2i_jax.text.cache import FeatureCache
from t2i_jax.text.tokenizer import CaptionTokenizer


class WithIndex:
    """A random-access source whose records also carry their own index ("index")."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[index], "index": index}

    def __repr__(self) -> str:
        # grain checks a restored iterator's source by its repr: one without the object's
        # address, so another process (a resumed run) can restore the checkpoint.
        return f"WithIndex({self.source!r})"


class DrawCaption(grain.RandomMapTransform):
    """One of the record's captions ("captions": COCO's five per image), drawn per step.

    grain seeds each record's generator from the sampler's seed and the record's position
    in the epoch order, so the draw is a function of the run's seed and resumes exactly."""

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        captions = record["captions"]
        return {**record, "caption": captions[int(rng.integers(len(captions)))]}


class RandomFlip(grain.RandomMapTransform):
    """Mirrors the image left-right with probability 1/2 (`data.random_flip`). Captions
    that name left and right are then wrong for the flipped half."""

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        if rng.random() < 0.5:
            return {**record, "image": np.asarray(record["image"])[:, ::-1]}
        return record


@dataclasses.dataclass(frozen=True)
class ToBatchElement(grain.MapTransform):
    """Decodes one record: image to [-1, 1], caption to fixed-length tokens and mask, and
    the cached text features of the record when `features` is given."""

    tokenizer: CaptionTokenizer
    max_len: int
    source_name: str
    features: FeatureCache | None = None

    def map(self, record: dict) -> dict:
        image = np.asarray(record["image"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise DataError(
                f"image in {self.source_name} must be uint8[H, W, 3], "
                f"got {image.dtype}{list(image.shape)}"
            )
        caption = decode_caption(record["caption"], self.source_name)
        tokens, mask = self.tokenizer.encode([caption], self.max_len)
        element = {
            "image": image.astype(np.float32) / 127.5 - 1.0,
            "tokens": tokens[0],
            "mask": mask[0],
        }
        if self.features is not None:
            element.update(self.features.features(int(record["index"])))
        return element


def per_process_batch_size(global_batch_size: int, count: int) -> int:
    if global_batch_size % count:
        raise ConfigError(
            f"train.batch_size={global_batch_size} is not divisible by the {count} processes"
        )
    return global_batch_size // count


def make_loader(
    source,
    tokenizer: CaptionTokenizer,
    *,
    global_batch_size: int,
    max_len: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    name: str = "data",
    shard_index: int | None = None,
    shard_count: int | None = None,
    features: FeatureCache | None = None,
    several_captions: bool = False,
    random_flip: bool = False,
) -> grain.DataLoader:
    """A grain DataLoader over one shard (by default this JAX process's), batched.

    `features`: the text feature cache of this source (same records, same order).
    `several_captions`: records carry "captions", one is drawn per step (no feature cache).
    `random_flip`: mirror half the images, drawn per step.
    """
    if several_captions and features is not None:
        raise ConfigError(f"{name}: cached text features need one caption per record")
    if features is not None:
        if features.num_examples != len(source):
            raise DataError(
                f"text feature cache {features.directory} has {features.num_examples} "
                f"examples, {name} has {len(source)}"
            )
        source = WithIndex(source)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    local_batch = per_process_batch_size(global_batch_size, shard_count)
    shard = grain.ShardOptions(
        shard_index=shard_index, shard_count=shard_count, drop_remainder=True
    )
    if len(source) // shard_count < local_batch:
        raise ConfigError(
            f"{name} has {len(source)} records, fewer than one batch of {local_batch} per process"
        )
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain hands the parent's absl flags to its worker processes, and reading unparsed
        # flags raises; `t2i` parses its own command line, so there are none to parse.
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            *([DrawCaption()] if several_captions else []),
            *([RandomFlip()] if random_flip else []),
            ToBatchElement(tokenizer, max_len, name, features),
            grain.Batch(local_batch, drop_remainder=True),
        ],
        worker_count=worker_count,
    )


def to_global(batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
    """Assembles each process's part into global arrays split on the `data` axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
