"""One writer per workdir: `t2i train` holds an exclusive lock on WORKDIR/train.lock.

The lock is an advisory `flock` on the file, which the kernel releases when the holding
process ends however it ends, so a killed run never leaves a stale lock behind; the file
also names its holder (pid, host, start time) for the error a second run prints, and is
emptied on a clean exit. A run that finds the lock free but the file still naming a
holder took over from a run that did not finish (killed, crashed, or the machine lost),
and says so. In a multi-process job only process 0 takes it: one lock for the job.

flock works on local disks and on most cluster file systems (Lustre, GPFS, NFSv4 with
locking); on an object store (gs://) there is no lock, and the run says nothing about it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator

from t2i_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class WorkdirBusy(UserError):
    """Another process is training in this workdir."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {when})"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {"pid": "?", "host": "?"}
    return holder if isinstance(holder, dict) else {}


def _write(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
    os.fsync(fd)


@contextlib.contextmanager
def hold(workdir: str, *, enabled: bool = True) -> Iterator[None]:
    """Holds the workdir's lock for the block; WorkdirBusy if another process holds it."""
    if not enabled or "://" in workdir:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create the lock file {path}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {path}: {e.strerror}") from e
            raise WorkdirBusy(
                f"{workdir} is being trained by {_describe(_read(fd))}; wait for it to end "
                f"or stop it, or train in another workdir (lock: {path})"
            ) from None
        previous = _read(fd)
        if previous:
            log.warning(
                "taking over the lock of %s, which ended without releasing it (killed or "
                "crashed); its checkpoints are used as they are",
                _describe(previous),
            )
        _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # a full disk must not hide the run's error
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
