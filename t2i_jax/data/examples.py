"""A data set's examples as in-memory arrays, for evaluation and for training the evaluators.

`load_examples` reads the first records of a prepared split; `held_out_scenes` renders
`t2i_shapes` scenes with the held-out (shape, colour) pairs under a seed of their own (the
same kind of scenes as the `compositional` split, never its records); `concat` joins two sets.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from t2i_jax import rng
from t2i_jax.data import shapes, sources
from t2i_jax.data.image_decode import square_image
from t2i_jax.errors import DataError

READ_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Examples:
    """The first examples of a split, as arrays: images uint8 [N, H, W, 3], attributes [N]."""

    images: np.ndarray
    captions: list[str]
    attributes: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.captions)

    def head(self, num: int) -> Examples:
        """The first `num` examples."""
        return Examples(
            self.images[:num],
            self.captions[:num],
            {k: v[:num] for k, v in self.attributes.items()},
        )


def load_examples(
    builder, split: str, num: int | None = None, image_size: int | None = None
) -> Examples:
    """Records 0..num-1 of `split` (all when num is None); fails if the split is shorter.
    `image_size`: each image resized to it as it is read (antialiased bicubic)."""
    source = builder.as_data_source(split)
    num = len(source) if num is None else num
    if num > len(source):
        raise DataError(f"{builder.name} {split} has {len(source)} examples, {num} asked")
    images, records = [], []
    for start in range(0, num, READ_CHUNK):  # large sources resize as they are read
        chunk = source.__getitems__(list(range(start, min(num, start + READ_CHUNK))))
        images += [
            r["image"] if image_size is None else square_image(r["image"], image_size)
            for r in chunk
        ]
        records += [{k: v for k, v in r.items() if k != "image"} for r in chunk]
    where = f"{builder.name} {split}"
    return Examples(
        images=np.stack(images).astype(np.uint8, copy=False),
        captions=[
            sources.decode_caption(r["caption"], f"{where}[{i}]") for i, r in enumerate(records)
        ],
        attributes={  # none for data sets without attribute labels (imported ones)
            k: np.asarray([r["attributes"][k] for r in records], np.int32)
            for k in records[0].get("attributes", {})
        },
    )


def held_out_scenes(builder, num: int, seed: int) -> Examples:
    """`num` scenes with held-out pairs, drawn under the evaluators' seed, not the data's."""
    scene_seed = rng.stream_seed(seed, "evaluators/held_out_scenes")
    if scene_seed == builder.builder_config.seed:
        raise DataError("evaluator scene seed collides with the data set's seed")
    examples = [shapes.make_example(scene_seed, "compositional", i) for i in range(num)]
    return Examples(
        images=np.stack([e["image"] for e in examples]),
        captions=[e["caption"] for e in examples],
        attributes={
            k: np.asarray([e["attributes"][k] for e in examples], np.int32)
            for k in examples[0]["attributes"]
        },
    )


def concat(a: Examples, b: Examples) -> Examples:
    return Examples(
        images=np.concatenate([a.images, b.images]),
        captions=a.captions + b.captions,
        attributes={k: np.concatenate([a.attributes[k], b.attributes[k]]) for k in a.attributes},
    )
