"""Unreadable checkpoints (checkpoint.py): reading falls back to the newest readable one
and names what it skipped; training moves the skipped ones aside; with none readable, or
with a checkpoint of another model, one line and exit 2, nothing moved."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import pytest
from helpers import EXPERIMENT

from t2i_jax import cli
from t2i_jax import config as config_lib
from t2i_jax.checkpoint import COMMIT_MARKER
from t2i_jax.runs.loading import load_run
from t2i_jax.train import loop
from t2i_jax.train.logging import read_metrics

# A failed read leaves tensorstore's pending reads of that checkpoint unawaited; their
# warnings at garbage collection say nothing about the test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _config(data_dir, steps: int):
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    config.data.dir = data_dir
    config.train.update(steps=steps, checkpoint_every=2, keep_checkpoints=10)
    config.train.async_checkpoints = False
    return config


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> str:
    """Six steps, checkpoints at 2, 4 and 6."""
    workdir = str(tmp_path_factory.mktemp("corrupt") / "run")
    loop.train_and_evaluate(
        _config(data_dir, 6), workdir, devices=jax.devices()[:1], show_progress=False
    )
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:3] == ["2", "4", "6"]
    return workdir


def _truncate_largest(step_dir: str) -> None:
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


CORRUPTIONS = {
    "truncated file": (_truncate_largest, "cannot restore checkpoint"),
    "missing file": (lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")), "cannot"),
    "garbage metadata": (
        lambda d: pathlib.Path(d, "state", "_METADATA").write_bytes(b"\x00{not json"),
        "cannot read",
    ),
    "no commit marker": (
        lambda d: os.remove(os.path.join(d, COMMIT_MARKER)),
        f"no {COMMIT_MARKER} (a save cut short)",
    ),
}


def _copy(run: str, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(run, workdir)
    return workdir


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_reading_falls_back_past_an_unreadable_newest_checkpoint(
    trained_run, tmp_path, corruption, caplog
):
    """What `t2i sample`, `t2i eval` and `t2i reconstruct` read (all through load_run)."""
    workdir = _copy(trained_run, tmp_path)
    corrupt, reason = CORRUPTIONS[corruption]
    step_dir = os.path.join(workdir, "checkpoints", "6")
    corrupt(step_dir)
    run = load_run(workdir)
    assert run.step == 4
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping checkpoint {step_dir}: ")
    assert reason in skipped[0]
    assert os.path.isdir(step_dir)  # reading moves nothing


def test_training_moves_the_unreadable_one_aside_and_goes_on(trained_run, data_dir, tmp_path):
    workdir = _copy(trained_run, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    os.remove(os.path.join(checkpoints, "6", COMMIT_MARKER))
    with open(os.path.join(checkpoints, "6", "state", "_METADATA"), "rb") as f:
        marked = f.read()
    loop.train_and_evaluate(
        _config(data_dir, 8), workdir, devices=jax.devices()[:1], show_progress=False
    )
    steps = sorted(os.listdir(checkpoints))
    assert [s for s in steps if s.isdigit()] == ["2", "4", "6", "8"]  # 6 trained again
    assert "corrupt-6" in steps
    with open(os.path.join(checkpoints, "corrupt-6", "state", "_METADATA"), "rb") as f:
        assert f.read() == marked  # the skipped one, as it was
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == [2, 4, 6, 8]  # the log resumed from step 4


def test_with_no_readable_checkpoint_every_command_stops_and_nothing_moves(
    trained_run, data_dir, tmp_path, capsys
):
    workdir = _copy(trained_run, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    for step in ("2", "4", "6"):
        os.remove(os.path.join(checkpoints, step, COMMIT_MARKER))
    before = sorted(os.listdir(checkpoints))
    train = ["train", "--config", f"{EXPERIMENT}:test", "--workdir", workdir, "--no-progress",
             f"--config.data.dir={data_dir}", "--config.train.checkpoint_every=2"]  # fmt: skip
    sample = ["sample", "--workdir", workdir, "--prompt", "a red circle", "--out",
              str(tmp_path / "grid.png")]  # fmt: skip
    for argv in (train, sample):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"t2i: error: no readable checkpoint in {checkpoints} ("
            + "; ".join(
                f"step {s}: {checkpoints}/{s}: no {COMMIT_MARKER} (a save cut short)"
                for s in (6, 4, 2)
            )
            + ")"
        ]
        assert sorted(os.listdir(checkpoints)) == before
    assert not (tmp_path / "grid.png").exists()


def test_a_checkpoint_of_another_model_is_an_error_not_a_fallback(trained_run, tmp_path, capsys):
    workdir = _copy(trained_run, tmp_path)
    path = os.path.join(workdir, "config.json")
    config = json.loads(pathlib.Path(path).read_text())
    config["model"]["base_channels"] *= 2
    with open(path, "w") as f:
        json.dump(config, f)
    out = str(tmp_path / "grid.png")
    assert cli.main(["sample", "--workdir", workdir, "--prompt", "a red circle", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        f"t2i: error: checkpoint {workdir}/checkpoints/6 holds another model than this run's "
        "config builds ("
    )
    assert err[0].endswith("was the config or the method changed?")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:3] == ["2", "4", "6"]
