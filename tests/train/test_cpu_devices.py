"""`mesh.cpu_devices`: the CPU backend split into data-parallel devices before JAX starts."""

import logging
import subprocess
import sys

import jax
import pytest
from helpers import cli_env, run_cli, train_args

from t2i_jax.errors import UserError
from t2i_jax.train import multihost


def test_split_before_jax_starts_gives_that_many_devices():
    code = (
        "from t2i_jax.train import multihost\n"
        "assert multihost.split_cpu(3)\n"
        "import jax\n"
        "print(len(jax.devices()), jax.device_count('cpu'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["3", "3"], out.stderr


def test_once_jax_has_started_a_split_is_refused_with_a_warning(caplog):
    have = len(jax.devices("cpu"))  # this process's (conftest: 8)
    with caplog.at_level(logging.WARNING, logger="t2i_jax.train.multihost"):
        assert not multihost.split_cpu(have - 1)
    assert f"mesh.cpu_devices={have - 1} not applied" in caplog.text
    assert len(jax.devices("cpu")) == have
    assert multihost.split_cpu(have) and multihost.split_cpu(0)
    with pytest.raises(UserError, match="mesh.cpu_devices must be >= 0"):
        multihost.split_cpu(-1)


def test_t2i_train_splits_the_cpu_as_its_config_says(tmp_path, data_dir):
    """The command splits before it checks the config (the checks run JAX): the run's mesh
    spans the devices asked for, in a shell whose JAX has one."""
    args = train_args(tmp_path / "run", data_dir, "--config.train.steps=1")
    out = run_cli(*args, "--config.mesh.cpu_devices=2")
    assert out.returncode == 0, out.stderr
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 cpu devices" in out.stderr


def test_configs_without_the_key_or_the_mesh_section_keep_jax_s_devices():
    """Runs and hand-written configs from before `mesh.cpu_devices` (or any mesh section)
    take 0: JAX's own devices."""
    from helpers import EXPERIMENT

    from t2i_jax import config as config_lib
    from t2i_jax import sharding

    config = config_lib.load_config(f"{EXPERIMENT}:test")
    del config.mesh["cpu_devices"]
    assert sharding.mesh_config(config).cpu_devices == 0
    del config["mesh"]
    assert sharding.mesh_config(config).cpu_devices == 0
    assert sharding.mesh_config(config_lib.load_config(f"{EXPERIMENT}:demo")).cpu_devices == 2
