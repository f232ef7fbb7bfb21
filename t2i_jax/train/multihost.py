"""Several processes (one per host, or per GPU under SLURM) training one run.

`initialize` starts jax.distributed: by itself under SLURM (`srun` with more than one task)
and on a multi-host Cloud TPU VM, from `--coordinator/--num-processes/--process-id`
elsewhere. After it, `jax.devices()` lists every process's devices, the mesh spans them
all, each process reads its own shard of the records and writes its shards of each
checkpoint, and process 0 alone writes logs, grids and reports.

A process that dies is noticed by the others through jax.distributed's heartbeats: after
`heartbeat_timeout` seconds without one, the survivors exit with an error instead of
waiting in a collective for ever.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from t2i_jax.errors import UserError

log = logging.getLogger(__name__)

# Seconds without a heartbeat after which a peer counts as dead (jax's default is 100).
DEFAULT_HEARTBEAT_TIMEOUT = 60


def detected_cluster() -> str | None:
    """ "slurm" or "tpu" when this process is one of several that a cluster launched (so
    jax.distributed.initialize() finds its peers by itself), else None."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(v in os.environ for v in slurm) and int(os.environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def split_cpu(devices: int) -> bool:
    """Splits the CPU backend into `devices` devices (0: leave JAX's default); other
    backends ignore it. Returns whether the CPU has that many devices now. The t2i
    commands call it before anything runs JAX; in a Python session where JAX has started
    it can no longer act, and says so (the run then uses the devices there are)."""
    if devices < 0:
        raise UserError(f"mesh.cpu_devices must be >= 0 (0: JAX's default), got {devices}")
    if not devices:
        return True
    try:
        jax.config.update("jax_num_cpu_devices", devices)
        return True
    except RuntimeError:  # JAX has started
        have = len(jax.devices("cpu"))
        if have != devices:
            log.warning(
                "mesh.cpu_devices=%d not applied: JAX started with %d CPU devices already",
                devices,
                have,
            )
        return have == devices


def initialize(
    *,
    distributed: bool = False,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
) -> bool:
    """Starts jax.distributed when asked to or when a cluster launched this process;
    returns whether it did. Must run before anything touches a device."""
    if (num_processes is not None or process_id is not None) and coordinator is None:
        raise UserError("--num-processes and --process-id need --coordinator HOST:PORT")
    if coordinator is not None and (num_processes is None or process_id is None):
        raise UserError("--coordinator needs --num-processes and --process-id")
    if not (distributed or coordinator or detected_cluster()):
        return False
    # CPU hosts need a collectives backend; GPUs and TPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )
    return True


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective: all must call it)."""
    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))
