"""Data integrity (data/integrity.py): a prepared data set whose files were truncated,
changed or removed afterwards is refused at load with one line saying how to rebuild it."""

from __future__ import annotations

import json
import os
import shutil

import image_sources
import pytest
from helpers import EXPERIMENT

from t2i_jax import cli
from t2i_jax.data import integrity, sources
from t2i_jax.errors import DataError

SHARD = "t2i_shapes-train.array_record-00000-of-00001"


@pytest.fixture
def data_copy(data_dir, tmp_path) -> str:
    """The session's prepared data (copied with its times, as `cp -p` would)."""
    copy = str(tmp_path / "data")
    shutil.copytree(data_dir, copy)
    return copy


def _folder(data_dir: str) -> str:
    return sources.load_builder("t2i_shapes", data_dir, "small").data_dir


def test_preparation_records_every_data_file(data_copy):
    folder = _folder(data_copy)
    with open(os.path.join(folder, integrity.MANIFEST)) as f:
        files = json.load(f)["files"]
    assert sorted(files) == integrity.data_files(folder)
    assert SHARD in files and "dataset_info.json" in files
    assert files[SHARD]["bytes"] == os.path.getsize(os.path.join(folder, SHARD))
    assert not any(name.endswith(".model") for name in files)  # the tokenizer is not data
    sources.prepare("t2i_shapes", data_copy, "small")  # an untouched copy loads


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


CHANGES = {
    "truncated": (_truncate, " has {small} bytes, {size} when prepared"),
    "same size, other bytes": (
        _flip_a_byte,
        "'s contents differ (SHA-256) from when it was prepared",
    ),
    "missing": (os.remove, " is missing"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_built_in_data_set_is_refused_with_how_to_rebuild(data_copy, change):
    folder = _folder(data_copy)
    path = os.path.join(folder, SHARD)
    size = os.path.getsize(path)
    modify, what = CHANGES[change]
    modify(path)
    what = what.format(small=size - 100, size=size)
    with pytest.raises(DataError) as e:
        sources.prepare("t2i_shapes", data_copy, "small")
    assert str(e.value) == (
        f"data set t2i_shapes in {folder} changed after it was prepared: {SHARD}{what}; "
        f"delete {folder} to have it built again on the next run (or `t2i data prepare "
        f"t2i_shapes --data-dir {data_copy} --variant small`)"
    )


def test_a_training_run_on_changed_data_stops_with_one_line(data_copy, tmp_path, capsys):
    _truncate(os.path.join(_folder(data_copy), SHARD))
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", f"{EXPERIMENT}:test", "--workdir", str(workdir),
                     f"--config.data.dir={data_copy}", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("t2i: error: data set t2i_shapes in ") and SHARD in err[0]
    assert not (workdir / "checkpoints").exists()


def test_a_changed_import_is_refused_before_tfds_reads_it(tmp_path):
    src, data_dir = tmp_path / "src", tmp_path / "data"
    image_sources.make_folder(str(src))
    cli.main(["data", "import", str(src), "--name", "photos", "--format", "folder",
              "--data-dir", str(data_dir), "--image-size", "32", "--no-progress"])  # fmt: skip
    folder = str(data_dir / "photos")
    sources.load_builder("photos", str(data_dir), "default")  # as imported: fine
    _truncate(os.path.join(folder, "dataset_info.json"))
    with pytest.raises(DataError, match="dataset_info.json has .* bytes") as e:
        sources.load_builder("photos", str(data_dir), "default")
    assert str(e.value).endswith(
        f"import it again: t2i data import SRC --name photos --data-dir {data_dir} --overwrite"
    )
