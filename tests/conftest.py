"""Test set-up: 8 simulated CPU devices (before jax is imported) and shared small data."""

import atexit
import fcntl
import os
import shutil
import tempfile

# Every in-process test sees 8 devices, so sharded code paths are the ones tested.
# Most of the suite's CPU time is XLA compiling many small programs once each; without
# LLVM's optimisations it compiles in about two thirds of the time (measured on a CLI
# training run: 44 -> 28 s of CPU). (XLA's classic CPU fusion emitters,
# `--xla_cpu_use_fusion_emitters=false`, compile a test train step in 9.3 s, not 12.8, but
# they miscompile the code prior's float64 uncached sampling loop: its draws differ from
# the default emitters' from the first code on, not by round-off; the elementwise float64
# functions agree to 1e-15. test_cached_sampling_equals_uncached_sampling fails with them.)
# The programs are the same HLO; tests compare against references within tolerances, and
# bitwise comparisons are between runs under the same flags (`helpers.TEST_XLA_FLAGS` for
# the CLI's processes). Demos and benchmarks use XLA's defaults.
from helpers import TEST_XLA_FLAGS  # noqa: E402

_flags = os.environ.get("XLA_FLAGS", "").split()
for _flag in ("--xla_force_host_platform_device_count=8", TEST_XLA_FLAGS):
    if _flag not in _flags:
        _flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_flags)
# Many tests train the same small configs (a run, then its resumption, then the CLI's own
# process): XLA's persistent compilation cache compiles each program once per session. The
# CLI subprocesses and pytest-xdist workers (started after this runs) inherit the variable,
# so they share one cache. Results are the same with or without it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="t2i-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Every program, not only those that take a second to compile: the CLI's processes
# recompile many small ones (sampling, validation, metrics).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402
from helpers import EXPERIMENT  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The `small` t2i_shapes build, prepared once for the whole session."""
    from t2i_jax.data import sources

    path = str(tmp_path_factory.mktemp("data"))
    sources.prepare("t2i_shapes", path, "small")
    return path


@pytest.fixture(scope="session")
def evaluators_trained(data_dir, tmp_path_factory, worker_id) -> str:
    """`data_dir` with the data set's evaluators in place (what `t2i eval` trains on first
    use), trained once per session: pytest-xdist's workers each have their own data_dir,
    and the first to get here copies its evaluators to the session's folder for the others.
    Training them is deterministic (seed 0), so a copy equals a retraining."""
    from t2i_jax.data import sources
    from t2i_jax.eval import evaluators as ev

    base = tmp_path_factory.getbasetemp()
    session_root = base.parent if worker_id != "master" else base
    shared = session_root / "shared-evaluators"
    target = ev.evaluators_dir(sources.load_builder("t2i_shapes", data_dir, "small"))
    with open(session_root / "evaluators.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.isdir(target):
            if shared.is_dir():
                shutil.copytree(shared, target)
            else:
                ev.train_evaluators("t2i_shapes", data_dir, "small", seed=0)
                shutil.copytree(target, shared)
    return data_dir


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """Random Inception weights (`helpers.INCEPTION_SEED`) in pytorch-fid's file format."""
    from helpers import write_random_inception

    return write_random_inception(
        str(tmp_path_factory.mktemp("inception") / "fid_random.safetensors")
    )


@pytest.fixture
def test_config(data_dir):
    """The experiment's `test` variant pointed at the session's data."""
    from t2i_jax import config as config_lib

    config = config_lib.load_config(f"{EXPERIMENT}:test")
    config.data.dir = data_dir
    return config


# The files that take longest (`--durations`), heaviest first. With `--dist loadfile
# --no-loadscope-reorder` (`make test`) pytest-xdist hands out whole files in collection
# order, so starting with these keeps both workers busy to the end instead of leaving one
# of them on a long file last. Order only: every test still runs, in its file's order.
LONGEST_FILES = (  # worker-seconds of each file in one `make test` on a 2-core machine
    "test_cli.py",  # 317
    "test_cli_vae.py",  # 243
    "train/test_multiprocess.py",  # 231
    "train/test_scaling_options.py",  # 184
    "test_fid.py",  # 161
    "data/test_import.py",  # 161
    "train/test_kill_points.py",  # 159
    "train/test_resume.py",  # 145
    "methods/test_gan.py",  # 141
    "test_cli_ablate.py",  # 134
    "text/test_encoders_in_training.py",  # 130
    "methods/test_diffusion.py",  # 128
    "nets/test_remat.py",  # 126
    "methods/test_vqvae.py",  # 118
    "train/test_fsdp.py",  # 111
    "train/test_full_configs.py",  # 109
    "train/test_nonfinite.py",  # 101
    "methods/test_gan_training.py",  # 98
    "methods/test_vae.py",  # 91
    "train/test_corrupt_checkpoints.py",  # 88
    "train/test_write_failures.py",  # 78
    "test_evaluate.py",  # 60
    "methods/test_code_prior.py",  # 57
    "test_lpips.py",  # 44
)


def pytest_collection_modifyitems(config, items):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    rank = {os.path.join(tests_dir, name): i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))  # stable sort
