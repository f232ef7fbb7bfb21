"""Test set-up: 8 simulated CPU devices (before jax is imported) and shared small data."""

import atexit
import os
import shutil
import tempfile

# Every in-process test sees 8 devices, so sharded code paths are the ones tested.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Many tests train the same small configs (a run, then its resumption, then the CLI's own
# process): XLA's persistent compilation cache compiles each program once per session. The
# CLI subprocesses and pytest-xdist workers (started after this runs) inherit the variable,
# so they share one cache. Results are the same with or without it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="t2i-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402
from helpers import EXPERIMENT  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The `small` t2i_shapes build, prepared once for the whole session."""
    from t2i_jax.data import sources

    path = str(tmp_path_factory.mktemp("data"))
    sources.prepare("t2i_shapes", path, "small")
    return path


@pytest.fixture
def test_config(data_dir):
    """The experiment's `test` variant pointed at the session's data."""
    from t2i_jax import config as config_lib

    config = config_lib.load_config(f"{EXPERIMENT}:test")
    config.data.dir = data_dir
    return config
