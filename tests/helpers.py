"""Paths and small utilities shared by the tests."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "diffusion_shapes.py")


def run_cli(
    *args: str, env_extra: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs the real `t2i` entry point in a fresh process (one CPU device)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "t2i_jax.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
