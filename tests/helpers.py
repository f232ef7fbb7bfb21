"""Paths and small utilities shared by the tests."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "diffusion_shapes.py")


def train_args(workdir, data_dir, *extra: str) -> list[str]:
    """`t2i train` arguments for the experiment's `test` variant on the test data."""
    return [
        "train",
        "--config",
        f"{EXPERIMENT}:test",
        "--workdir",
        str(workdir),
        f"--config.data.dir={data_dir}",
        "--no-progress",
        *extra,
    ]


def cli_env() -> dict:
    """The environment of a user's shell: one CPU device, not the tests' eight."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def start_cli(*args: str) -> subprocess.Popen:
    """Starts the real `t2i` entry point without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-m", "t2i_jax.cli", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(
    *args: str, env_extra: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs the real `t2i` entry point in a fresh process (one CPU device)."""
    env = {**cli_env(), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "t2i_jax.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
