"""TFDS builder for `t2i_shapes`, made locally from `shapes.make_example` (no download, no TF).

Usage:
    builder = prepare("/tmp/tfds", config="small")
    source = builder.as_data_source("train")  # random access, no TensorFlow
    example = source[0]  # {"image": uint8[32, 32, 3], "caption": bytes, "attributes": {...}}

Records are stored as array_record, the only format TFDS can write and read without
TensorFlow, so every builder here is made through `load_builder`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from t2i_jax import presets
from t2i_jax.data import shapes

_DESCRIPTION = """\
Procedural scenes (32x32; larger in the `_NNpx` configs) of one or two shapes (circle,
square, triangle) in six colours, two sizes, on a 3x3 grid, or two shapes related by
"left of" / "above". Each scene has a caption drawn from several templates and integer
attribute labels. The (shape, colour) pairs in
`t2i_jax.data.shapes.HELD_OUT` occur only in the `compositional` split.
"""


# Split sizes of the two configs: 20k train and 1k of each other split; tiny ones for tests.
SPLIT_COUNTS: dict[str, dict] = {
    "default": {"description": "20k train; 1k validation/test/compositional."},
    "small": {
        "description": "Tiny sizes for tests.",
        "train": 512,
        "validation": 64,
        "test": 64,
        "compositional": 64,
    },
}
IMAGE_SIZES = (32, 64, 128, 256)  # 32: the plain names; others: NAME_{size}px


@dataclasses.dataclass
class T2iShapesConfig(tfds.core.BuilderConfig):
    """A config: the generation seed, the number of examples per split and the image size
    (the same scenes and captions at every size)."""

    seed: int = 0
    image_size: int = shapes.IMAGE_SIZE
    train: int = 20_000
    validation: int = 1_000
    test: int = 1_000
    compositional: int = 1_000

    def split_sizes(self) -> dict[str, int]:
        return {split: getattr(self, split) for split in shapes.SPLITS}


class T2iShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes with captions and attribute labels, with a compositional split."""

    name = "t2i_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        T2iShapesConfig(name=presets.shapes_variant(base, size), image_size=size, **counts)
        for base, counts in SPLIT_COUNTS.items()
        for size in IMAGE_SIZES
    ]
    DEFAULT_CONFIG_NAME = "default"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup needs `importlib_resources`, which is not a dependency here; it
        # only serves to find an (absent) checksums file next to the module.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        # Tensor rather than Image: Image encoding needs TensorFlow; 3 KB per image is fine.
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "attributes": tfds.features.FeaturesDict(
                    {
                        k: tfds.features.Tensor(shape=(), dtype=np.int32)
                        for k in shapes.ATTRIBUTE_KEYS
                    }
                ),
            }
        )
        # Explicit info rather than dataset_info_from_configs, which expects the metadata files
        # of a TFDS dataset package (README, citations, tags) next to the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=features,
            homepage=None,
            supervised_keys=None,
            # Keep generation order, so record i of a split is `make_example(seed, split, i)`;
            # the input pipeline shuffles from the run's seed.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is generated locally.
        return {
            split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes().items()
        }

    def _generate_examples(self, split: str, num_examples: int):
        seed, size = self.builder_config.seed, self.builder_config.image_size
        for index in range(num_examples):
            yield index, shapes.make_example(seed, split, index, size)


def load_builder(data_dir: str | os.PathLike, config: str = "default") -> T2iShapes:
    """The builder for `config`, stored under `data_dir` as array_record (no TF needed)."""
    return T2iShapes(data_dir=os.fspath(data_dir), config=config, file_format="array_record")


def prepare(data_dir: str | os.PathLike, config: str = "default") -> T2iShapes:
    """Generates the dataset under `data_dir` unless already there; returns the builder."""
    builder = load_builder(data_dir, config)
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                try_download_gcs=False,  # Never reach for the network: the data is made here.
            )
        )
    return builder
