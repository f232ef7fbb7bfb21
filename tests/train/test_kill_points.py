"""A run stopped at any moment and started again with the same command finishes with the
log and final grid of the run never stopped, byte for byte.

SIGKILL at ten moments drawn from a seeded RNG: the first while the data set is being
built, the others a random delay after a random logged step, half of those steps being
ones where a checkpoint is saved, validation runs or a grid is sampled (the delays put
the kill inside those phases or just after). SIGTERM while a checkpoint is being written:
the run stops with a readable checkpoint (exit 75) and resumes.

The VAE's `test` variant: it has every phase (validation included) and trains fast.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import time

import pytest
from helpers import REPO, run_cli, start_cli

from t2i_jax.checkpoint import Checkpointer
from t2i_jax.train.logging import read_metrics

STEPS = 40
FLAGS = (f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=10",
         "--config.train.eval_every=10", "--config.train.sample_every=20",
         "--config.train.keep_checkpoints=10")  # fmt: skip
PHASE_STEPS = (10, 20, 30)  # a checkpoint, validation, and at 20 a grid


def train_args(workdir, data_dir) -> list[str]:
    config = os.path.join(REPO, "experiments", "vae_shapes.py:test")
    return ["train", "--config", config, "--workdir", str(workdir),
            f"--config.data.dir={data_dir}", "--no-progress", *FLAGS]  # fmt: skip


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("never_stopped") / "run"
    result = run_cli(*train_args(workdir, data_dir))
    assert result.returncode == 0, result.stderr
    return workdir


def _logged_step(workdir) -> int:
    try:
        rows = read_metrics(str(workdir))
    except ValueError:  # a line being written
        return 0
    return max((row["step"] for row in rows), default=0)


def _kill_when(proc, ready, delay: float, too_far=lambda: False, timeout: float = 300) -> bool:
    """SIGKILL `delay` seconds after `ready()` holds, or sooner once `too_far()` does (a
    fast machine must not finish the run within the delay); False if the run ended first."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.01)
    end = time.time() + delay
    while time.time() < end and not too_far():
        time.sleep(0.01)
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.communicate()
    return True


def _assert_same_as(workdir, reference) -> None:
    final = f"samples/step_{STEPS}.png"
    assert (workdir / final).read_bytes() == (reference / final).read_bytes()
    assert read_metrics(str(workdir)) == read_metrics(str(reference))  # timings aside


def test_killed_at_ten_random_moments_finishes_as_the_run_never_stopped(never_stopped, tmp_path):
    rng = random.Random(0)
    data = tmp_path / "data"  # built by the first leg: the same records as the session's
    workdir = tmp_path / "run"
    args = train_args(workdir, data)

    proc = start_cli(*args)
    building = lambda: bool(glob.glob(str(data / "t2i_shapes" / "**" / "*incomplete*"),
                                      recursive=True))  # noqa: E731  # fmt: skip
    assert _kill_when(proc, building, rng.uniform(0, 0.2)), "finished during data preparation"

    kills = 1
    while kills < 10:
        target = rng.choice(PHASE_STEPS) if rng.random() < 0.5 else rng.randint(2, 30)
        delay = rng.uniform(0, 1.5)
        proc = start_cli(*args)
        reached = lambda t=target: _logged_step(workdir) >= t  # noqa: E731
        too_far = lambda t=target: _logged_step(workdir) >= t + 6  # noqa: E731
        if _kill_when(proc, reached, delay, too_far):
            kills += 1
        else:  # it reached the end before the moment came: start it again
            assert proc.returncode == 0, proc.communicate()[1][-3000:]
            pytest.fail(f"the run finished before kill {kills + 1} (step {target} + {delay:.2f} s)")
        assert not (workdir / "report.md").exists()

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    _assert_same_as(workdir, never_stopped)


def test_sigterm_while_a_checkpoint_is_written_leaves_it_readable(
    never_stopped, data_dir, tmp_path
):
    workdir = tmp_path / "run"
    proc = start_cli(*train_args(workdir, data_dir))
    saving = lambda: bool(glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*")))  # noqa: E731
    deadline = time.time() + 300
    while not saving():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    checkpointer = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    steps = sorted(checkpointer.manager.all_steps())
    for step in steps:  # every one complete: the one in flight and the one on the signal
        checkpointer.check_complete(step)
        checkpointer.restore_meta(step)
    checkpointer.close()
    assert f"stopped by SIGTERM at step {steps[-1]}; checkpoint saved" in stderr
    result = run_cli(*train_args(workdir, data_dir))
    assert result.returncode == 0, result.stderr
    _assert_same_as(workdir, never_stopped)
