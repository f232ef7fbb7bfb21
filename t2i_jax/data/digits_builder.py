"""TFDS builder for `digits`: real handwritten digits with captions, made locally.

scikit-learn ships the test half of UCI's "Optical Recognition of Handwritten Digits"
(1,797 digits by 43 writers, 8x8 at 17 grey levels). Each becomes a 32x32 RGB image (ink
bright on black, the grey levels scaled to 0-255, upsampled with Pillow's bicubic filter)
with a caption from several templates ("a handwritten seven"). A fixed permutation from
the config's seed splits them 80/10/10 into train, validation and test.

Records: {"image": uint8[32, 32, 3], "caption": str, "attributes": {"digit", "template",
"source_index"}} (`source_index`: the row of `sklearn.datasets.load_digits`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

IMAGE_SIZE = 32
NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
TEMPLATES: tuple[str, ...] = (
    "a handwritten {name}",
    "the digit {name}, written by hand",
    "a handwritten number {name}",
    "{name}, handwritten",
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
ATTRIBUTE_KEYS: tuple[str, ...] = ("digit", "template", "source_index")

_DESCRIPTION = """\
1,797 real handwritten digits (scikit-learn's copy of UCI's optical recognition set, 8x8
grey levels) upsampled to 32x32 RGB, each with a caption naming the digit from one of
several templates. Splits 80/10/10 by a fixed permutation.
"""


def caption(digit: int, template: int) -> str:
    return TEMPLATES[template].format(name=NAMES[digit])


def to_image(grey: np.ndarray) -> np.ndarray:
    """An 8x8 digit (0-16) as uint8 [32, 32, 3]: bicubic upsampling of the 0-255 levels."""
    levels = np.rint(np.asarray(grey, np.float64) * (255.0 / 16.0)).astype(np.uint8)
    big = Image.fromarray(levels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return np.repeat(np.asarray(big)[..., None], 3, axis=-1)


def split_indices(seed: int, count: int) -> dict[str, np.ndarray]:
    """Rows of each split: a permutation from `seed`, cut 80/10/10 (each split sorted)."""
    order = np.random.default_rng(seed).permutation(count)
    n_val = n_test = count // 10
    n_train = count - n_val - n_test
    cuts = {"train": order[:n_train], "validation": order[n_train : n_train + n_val]}
    cuts["test"] = order[n_train + n_val :]
    return {split: np.sort(rows) for split, rows in cuts.items()}


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
    """The seed of the split permutation and of each digit's caption template."""

    seed: int = 0


class Digits(tfds.core.GeneratorBasedBuilder):
    """Handwritten digits with captions."""

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [DigitsConfig(name="default", description="All 1,797 digits, 80/10/10.")]
    DEFAULT_CONFIG_NAME = "default"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)  # as shapes_builder.py: no checksums file to find

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "attributes": tfds.features.FeaturesDict(
                    {k: tfds.features.Tensor(shape=(), dtype=np.int32) for k in ATTRIBUTE_KEYS}
                ),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=features,
            homepage="https://archive.ics.uci.edu/dataset/80",
            supervised_keys=None,
            disable_shuffling=True,  # record order = sorted source rows; runs shuffle
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # scikit-learn ships the data
        from sklearn.datasets import load_digits

        digits = load_digits()
        rows = split_indices(self.builder_config.seed, len(digits.target))
        return {
            split: self._generate_examples(digits.images, digits.target, rows[split])
            for split in SPLITS
        }

    def _generate_examples(self, images, targets, rows):
        seed = self.builder_config.seed
        for index, row in enumerate(rows):
            digit = int(targets[row])
            rng = np.random.default_rng([seed, int(row)])
            template = int(rng.integers(len(TEMPLATES)))
            yield (
                index,
                {
                    "image": to_image(images[row]),
                    "caption": caption(digit, template),
                    "attributes": {
                        "digit": np.int32(digit),
                        "template": np.int32(template),
                        "source_index": np.int32(row),
                    },
                },
            )
