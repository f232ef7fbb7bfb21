"""One writer per workdir (train/workdir_lock.py): a second `t2i train` on a workdir in use
exits 2 naming the holder and writes nothing; a lock left by a killed run is taken over
with a warning; a run that ends releases it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from helpers import REPO, train_args

from t2i_jax import cli
from t2i_jax.train import workdir_lock

HOLDER = """
import sys, time
from t2i_jax.train import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(workdir) -> subprocess.Popen:
    """Another process holding the workdir's lock, as a running `t2i train` does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(
    tmp_path, data_dir, capsys, caplog
):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = start_holder(workdir)
    try:
        assert cli.main(train_args(workdir, data_dir)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"t2i: error: {workdir} is being trained ")
        assert f"process {holder.pid} on " in err[0]
        assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    # The killed holder's lock: free (the kernel released it) but still naming it.
    assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == holder.pid
    with workdir_lock.hold(str(workdir)):
        mine = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
        assert mine["pid"] == os.getpid() and mine["started"] <= time.time()
    assert f"taking over the lock of process {holder.pid} on " in caplog.text
    # Released on a clean exit: the next run takes it without a warning.
    assert (workdir / workdir_lock.LOCK_FILE).read_text() == ""
    caplog.clear()
    with workdir_lock.hold(str(workdir)):
        pass
    assert "taking over" not in caplog.text


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    for _ in range(2):  # the second would be refused if the first had kept it
        try:
            with workdir_lock.hold(str(tmp_path)):
                raise RuntimeError("a failed run")
        except RuntimeError:
            pass
    assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""
