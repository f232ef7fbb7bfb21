"""Writing a TFDS data set folder (array_record shards + metadata) byte for byte reproducibly.

TFDS's own generation serialises each tf.train.Example's feature map in hash order, which
differs between processes, so two identical imports would give different files. Here every
record is serialised with `deterministic=True` (map keys sorted) and written in the order
given; `tfds.builder_from_directory(folder)` reads the result like any prepared data set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer

from t2i_jax.errors import writing

# Shards of at most this many records: files of a few hundred MB at 256 px.
RECORDS_PER_SHARD = 4096


class SplitWriter:
    """Writes one split's records into shards named `NAME-SPLIT.array_record-i-of-n`."""

    def __init__(self, folder: str, name: str, split: str, features: tfds.features.FeaturesDict):
        self.folder, self.name, self.split = folder, name, split
        self.features = features
        self._serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        self._parts: list[str] = []
        self._lengths: list[int] = []
        self._writer = None
        self.num_bytes = 0

    def _open_part(self) -> None:
        path = os.path.join(self.folder, f".{self.split}-part{len(self._parts):05d}")
        self._parts.append(path)
        self._lengths.append(0)
        with self._writing(path):
            self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")

    def write(self, example: dict) -> None:
        if self._writer is None or self._lengths[-1] >= RECORDS_PER_SHARD:
            self.close()
            self._open_part()
        encoded = self.features.encode_example(example)
        data = self._serializer.get_tf_example(encoded).SerializeToString(deterministic=True)
        with self._writing(self._parts[-1]):
            self._writer.write(data)
        self._lengths[-1] += 1
        self.num_bytes += len(data)

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with self._writing(self._parts[-1]):
                writer.close()

    @staticmethod
    def _writing(path: str):
        """array_record reports a failed write (disk full, an I/O error) as an OSError or
        the C++ status's RuntimeError or ValueError: one WriteError line."""
        return writing(path, also=(RuntimeError, ValueError))

    def finish(self) -> tfds.core.SplitInfo:
        """Renames the parts to their final shard names; returns the split's info."""
        self.close()
        if not self._parts:  # An empty split still gets one (empty) shard.
            self._open_part()
            self.close()
        template = self.template()
        for i, part in enumerate(self._parts):
            final = template.sharded_filepath(shard_index=i, num_shards=len(self._parts))
            os.replace(part, os.fspath(final))
        return tfds.core.SplitInfo(
            name=self.split,
            shard_lengths=list(self._lengths),
            num_bytes=self.num_bytes,
            filename_template=template,
        )

    def template(self) -> tfds.core.ShardedFileTemplate:
        return tfds.core.ShardedFileTemplate(
            data_dir=self.folder,
            dataset_name=self.name,
            split=self.split,
            filetype_suffix="array_record",
        )


def write_metadata(
    folder: str,
    name: str,
    features: tfds.features.FeaturesDict,
    splits: Iterable[tfds.core.SplitInfo],
    description: str,
) -> None:
    """dataset_info.json and features.json, so TFDS can open `folder` as a data set."""
    splits = list(splits)
    tfds.folder_dataset.write_metadata(
        data_dir=folder,
        features=features,
        split_infos=splits,
        filename_template=splits[0].filename_template.replace(split=None),
        check_data=False,
        description=description,
    )
