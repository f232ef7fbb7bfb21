"""Public TFDS data sets a user has prepared with TFDS, read through `tfds.data_source`.

    tfds build imagenet2012 --data_dir DIR     # ILSVRC2012's tar files in DIR/downloads/manual
    t2i train ... --config.data.name=imagenet2012 --config.data.dir=DIR \\
        --config.data.variant=64x64 --config.data.image_size=64

`PublicDataSet` gives such a set the interface of the built-in builders (`name`, `data_dir`,
`info.features`, `info.splits`, `as_data_source`), so every family, `t2i eval` and the
tokenizer use it unchanged. Its variant is the image size (`32x32`, `64x64` (default),
`128x128`, `256x256`): each image is resized on its shorter side (antialiased bicubic) and
centre-cropped as it is read. The tokenizer and the evaluators are written under
`DIR/t2i_jax/NAME/VARIANT/`, never inside TFDS's own folder.

- `imagenet2012`: the captions of an image are `TEMPLATES` over its class's name
  (torchvision's ImageNet category names, `imagenet_class_names.txt`, in TFDS's label
  order); the record carries all of them ("captions") and a run draws one per step from its
  seed. Splits: train and validation (TFDS's test split has no labels).
- `coco_captions`: COCO 2014 with the Karpathy splits (train + restval -> train, val ->
  validation, test); every caption of an image kept, one drawn per step. TFDS's builder for
  it imports TensorFlow: install the `tf` extra.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from t2i_jax.data.image_decode import square_image
from t2i_jax.errors import DataError

VARIANTS = {"default": 64, "32x32": 32, "64x64": 64, "128x128": 128, "256x256": 256}
ASSETS_DIRNAME = "t2i_jax"  # beside TFDS's folders in the data dir

# "a" / "an" is chosen per name; the first template is the one `t2i eval` and grids use.
TEMPLATES = (
    "a photo of {a} {name}",
    "a picture of {a} {name}",
    "a close-up photo of {a} {name}",
    "a cropped photo of {a} {name}",
    "a bright photo of {a} {name}",
    "a dark photo of {a} {name}",
    "a blurry photo of {a} {name}",
    "a low resolution photo of {a} {name}",
)


def article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def templated_captions(name: str) -> list[str]:
    return [t.format(a=article(name), name=name) for t in TEMPLATES]


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    path = os.path.join(os.path.dirname(__file__), "imagenet_class_names.txt")
    with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    assert len(names) == 1000, path
    return names


def imagenet_record(raw: dict, size: int) -> dict:
    label = int(raw["label"])
    captions = templated_captions(imagenet_class_names()[label])
    return {
        "image": square_image(raw["image"], size),
        "caption": captions[0],
        "captions": captions,
        "label": label,
    }


def coco_record(raw: dict, size: int) -> dict:
    """TFDS coco_captions' record ("captions": {"text": [n], "id": [n]}) -> ours."""
    captions = coco_captions_of(raw)
    if not captions:
        raise DataError(f"coco_captions image {int(raw['image/id'])} has no caption")
    return {"image": square_image(raw["image"], size), "caption": captions[0],
            "captions": captions}  # fmt: skip


def coco_captions_of(raw: dict) -> list[str]:
    captions = [_text(t) for t in np.asarray(raw["captions"]["text"]).reshape(-1)]
    return [c for c in captions if c.strip()]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class PublicSpec:
    tfds_name: str
    splits: dict[str, tuple[str, ...]]  # our split -> TFDS splits, concatenated
    to_record: Callable[[dict, int], dict]
    # All captions of the training split without reading its records (None: read them).
    training_captions: Callable[[], list[str]] | None = None
    captions_of: Callable[[dict], list[str]] | None = None  # a raw record's captions


SPECS = {
    "imagenet2012": PublicSpec(
        tfds_name="imagenet2012",
        splits={"train": ("train",), "validation": ("validation",)},
        to_record=imagenet_record,
        # Every template over every class: the captions that exist, each class once.
        training_captions=lambda: [
            c for n in imagenet_class_names() for c in templated_captions(n)
        ],
    ),
    "coco_captions": PublicSpec(
        tfds_name="coco_captions",
        splits={"train": ("train", "restval"), "validation": ("val",), "test": ("test",)},
        to_record=coco_record,
        captions_of=coco_captions_of,
    ),
}


class PublicSource:
    """Random access over the TFDS splits of one of our splits, records converted."""

    def __init__(self, sources: Sequence, to_record: Callable[[dict, int], dict], size: int):
        self.sources = list(sources)
        self.to_record = to_record
        self.size = size
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.to_record(self.sources[part][index - int(self.offsets[part])], self.size)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]


class _SplitInfo:
    """TFDS's SplitInfo.num_examples, read from the split's source when asked."""

    def __init__(self, dataset: PublicDataSet, split: str):
        self.dataset, self.split = dataset, split

    @property
    def num_examples(self) -> int:
        return len(self.dataset.as_data_source(self.split))


class PublicDataSet:
    """A prepared public TFDS data set with the interface of our builders."""

    def __init__(self, name: str, data_dir: str, variant: str):
        if variant not in VARIANTS:
            raise DataError(
                f"data set {name} has no variant {variant!r}; choose from {', '.join(VARIANTS)}"
            )
        self.spec = SPECS[name]
        self.name = name
        self.variant = "64x64" if variant == "default" else variant
        self.image_size = VARIANTS[variant]
        self.tfds_dir = os.path.expanduser(data_dir)
        self.data_dir = os.path.join(self.tfds_dir, ASSETS_DIRNAME, name, self.variant)
        self._sources: dict[str, PublicSource] = {}
        # "captions": every record carries all of its image's (`sources.has_several_captions`).
        features = {"image": types.SimpleNamespace(shape=(self.image_size,) * 2 + (3,)),
                    "captions": None}  # fmt: skip
        self.info = types.SimpleNamespace(
            features=features,
            full_name=f"{name}/{self.variant}",
            splits={s: _SplitInfo(self, s) for s in self.spec.splits},
        )

    def _tfds_source(self, tfds_split: str, decoders=None):
        try:
            return tfds.data_source(
                self.spec.tfds_name,
                split=tfds_split,
                data_dir=self.tfds_dir,
                download=False,
                decoders=decoders,
            )
        except ModuleNotFoundError as e:
            # TFDS re-raises the import error with its own message (and no module name).
            if (e.name or "").startswith("tensorflow") or "named 'tensorflow" in str(e):
                raise DataError(
                    f"{self.name}: TFDS's {self.spec.tfds_name} builder needs TensorFlow: "
                    "pip install 't2i_jax[tf]'"
                ) from None
            raise
        except Exception as e:  # noqa: BLE001 - TFDS raises many kinds for a missing set
            raise DataError(
                f"{self.name} is not prepared in {self.tfds_dir} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); prepare it first: tfds build "
                f"{self.spec.tfds_name} --data_dir {self.tfds_dir}"
            ) from None

    def as_data_source(self, split: str) -> PublicSource:
        if split not in self.spec.splits:
            raise DataError(f"{self.name} has no split {split!r} ({', '.join(self.spec.splits)})")
        if split not in self._sources:
            parts = [self._tfds_source(s) for s in self.spec.splits[split]]
            self._sources[split] = PublicSource(parts, self.spec.to_record, self.image_size)
        return self._sources[split]

    def prepare(self) -> PublicDataSet:
        """Opens every split (one clear line when the set is not prepared) and makes the
        folder for the tokenizer and evaluators."""
        for split in self.spec.splits:
            self.as_data_source(split)
        os.makedirs(self.data_dir, exist_ok=True)
        return self

    def training_captions(self) -> list[str]:
        if self.spec.training_captions is not None:
            return self.spec.training_captions()
        # The records' captions, their images left undecoded.
        skip = {"image": tfds.decode.SkipDecoding()}
        out = []
        for tfds_split in self.spec.splits["train"]:
            source = self._tfds_source(tfds_split, decoders=skip)
            for i in range(len(source)):
                out += self.spec.captions_of(source[i])
        return out
