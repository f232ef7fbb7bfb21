"""Write failures: a disk full (ENOSPC injected where the write happens) or a target that
cannot be written (a file where a folder must be, a folder where a file must be; the
tests may run as root, for whom permissions do not stop a write) stops the command with
one line naming the path and the error, exit 2, and every checkpoint written before it
reads and resumes."""

from __future__ import annotations

import errno
import os

import image_sources
import orbax.checkpoint as ocp
import pytest
from helpers import EXPERIMENT

from t2i_jax import cli
from t2i_jax.checkpoint import Checkpointer
from t2i_jax.data import record_writer

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


def _train(workdir, data_dir, capsys, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main([
        "train", "--config", f"{EXPERIMENT}:test", "--workdir", str(workdir), "--no-progress",
        f"--config.data.dir={data_dir}", "--config.train.checkpoint_every=2",
        "--config.train.keep_checkpoints=10", *extra,
    ])  # fmt: skip
    return code, capsys.readouterr().err.strip().splitlines()


def _readable_steps(workdir) -> list[int]:
    checkpointer = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    try:
        steps = sorted(checkpointer.manager.all_steps())
        for step in steps:
            checkpointer.check_complete(step)
            checkpointer.restore_meta(step)
        return steps
    finally:
        checkpointer.close()


def test_a_full_disk_or_an_unwritable_target_stops_the_run_and_it_resumes(
    tmp_path, data_dir, capsys, monkeypatch
):
    """One run through three failures: the step-4 checkpoint (disk full), the final grid
    (`samples` is a file), then the log of a longer run (`metrics.jsonl` is a folder)."""
    workdir = tmp_path / "run"
    save = ocp.CheckpointManager.save

    def full_disk_at_step_4(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, ENOSPC)
        return save(self, step, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ocp.CheckpointManager, "save", full_disk_at_step_4)
        code, err = _train(workdir, data_dir, capsys)
    checkpoints = workdir / "checkpoints"
    assert code == 2
    assert err == [f"t2i: error: cannot write checkpoint {checkpoints}/4: [Errno 28] {ENOSPC}"]
    assert _readable_steps(workdir) == [2]

    (workdir / "samples").write_text("not a folder")
    code, err = _train(workdir, data_dir, capsys)
    assert code == 2
    assert err == [f"t2i: error: cannot write {workdir}/samples: File exists"]
    assert _readable_steps(workdir) == [2, 4, 6]  # resumed from 2, saved before the grid

    (workdir / "samples").unlink()
    assert _train(workdir, data_dir, capsys)[0] == 0  # at step 6: the grid and the report
    assert (workdir / "samples" / "step_6.png").is_file() and (workdir / "report.md").is_file()

    os.replace(workdir / "metrics.jsonl", tmp_path / "metrics.jsonl")
    (workdir / "metrics.jsonl").mkdir()
    code, err = _train(workdir, data_dir, capsys, "--config.train.steps=8")
    assert code == 2
    assert err == [f"t2i: error: cannot write {workdir}/metrics.jsonl: Is a directory"]
    assert _readable_steps(workdir) == [2, 4, 6]


class FullDiskWriter:
    """array_record's writer on a disk that fills after `room` records."""

    room = 5

    def __init__(self, path: str, options: str):
        self.path, self.written = path, 0

    def write(self, data: bytes) -> None:
        if self.written >= self.room:
            raise OSError(errno.ENOSPC, ENOSPC)
        self.written += 1

    def close(self) -> None:
        pass


@pytest.mark.parametrize("failure", ["full disk", "unwritable data dir"])
def test_an_import_that_cannot_write_leaves_nothing(tmp_path, capsys, monkeypatch, failure):
    src, data_dir = tmp_path / "src", tmp_path / "data"
    image_sources.make_folder(str(src))
    if failure == "full disk":
        monkeypatch.setattr(record_writer.array_record_module, "ArrayRecordWriter", FullDiskWriter)
        expected = f"cannot write {data_dir}/.photos.import/photos/.train-part00000: {ENOSPC}"
    else:
        data_dir.write_text("a file where the data dir should be")
        expected = f"cannot write {data_dir}/.photos.import: Not a directory"
    code = cli.main(["data", "import", str(src), "--name", "photos", "--format", "folder",
                     "--data-dir", str(data_dir), "--image-size", "32",
                     "--no-progress"])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"t2i: error: {expected}"]
    if failure == "full disk":  # neither the data set, its working folder, nor the data dir
        assert not data_dir.exists()
