"""A run stopped after N steps and resumed to 2N equals 2N steps straight, bit for bit.

(Same seed, same numbers across separate processes is tested through the CLI in
test_cli.py, whose killed-and-resumed runs are compared with a reference run.)"""

import os

import jax
import numpy as np
import pytest
from helpers import REPO, untrained_vae_run

from t2i_jax import config as config_lib
from t2i_jax.runs.loading import load_run
from t2i_jax.train.logging import read_metrics
from t2i_jax.train.loop import train_and_evaluate

# One device: resuming is the same on any mesh, and restoring onto another mesh is
# test_fsdp.py's.
ONE_DEVICE = jax.devices()[:1]


def params_of(workdir):
    return jax.device_get(load_run(str(workdir)).state)


def load_test_config(experiment: str, data_dir: str):
    config = config_lib.load_config(os.path.join(REPO, "experiments", f"{experiment}:test"))
    config.data.dir = data_dir
    return config


@pytest.mark.parametrize(
    "experiment",
    [
        # Diffusion's resume is also checked end to end by test_cli.py's killed-and-resumed
        # runs (same log and final grid as a run never stopped), so `make test` skips it here.
        pytest.param("diffusion_shapes.py", marks=pytest.mark.slow),
        "gan_shapes.py",
        # The VAE resumes through the same loop, TrainState, skeleton and validator as the
        # VQ-VAE below (validation rows in the log included), so `make test` skips it.
        pytest.param("vae_shapes.py", marks=pytest.mark.slow),
        "vqvae_shapes.py",
        # Latent diffusion steps as diffusion does (whose resume test_cli.py checks) and
        # reads its frozen autoencoder from the run's store on every reopening (checked
        # bit for bit by test_cli_vae.py's load_run of an LDM run), so `make test` skips it.
        pytest.param("ldm_shapes.py", marks=pytest.mark.slow),
    ],
)
def test_resume_is_bitwise_equal(experiment, data_dir, tmp_path):
    """Every family's state: diffusion's one optimizer; the GAN's two players, two
    optimizer states and G's EMA; the VAE's and the VQ-VAE's (with its EMA codebook), whose
    logs also hold validation numbers, which must match after a resume too; latent
    diffusion's, with its frozen autoencoder."""
    test_config = load_test_config(experiment, data_dir)
    if experiment == "ldm_shapes.py":  # first the text-free VAE it reads
        os.makedirs(tmp_path / "vae")
        test_config.ldm.autoencoder = untrained_vae_run(data_dir, tmp_path / "vae")
    n = 3
    test_config.train.steps = 2 * n
    test_config.train.checkpoint_every = n
    test_config.train.log_every = 1  # The first leg logs its last step; so does straight.
    straight = tmp_path / "straight"
    train_and_evaluate(test_config, str(straight), show_progress=False, devices=ONE_DEVICE)

    resumed = tmp_path / "resumed"
    first = test_config.copy_and_resolve_references()
    first.train.steps = n
    train_and_evaluate(first, str(resumed), show_progress=False, devices=ONE_DEVICE)
    assert int(params_of(resumed).step) == n
    train_and_evaluate(test_config, str(resumed), show_progress=False, devices=ONE_DEVICE)

    a, b = params_of(straight), params_of(resumed)
    assert int(a.step) == int(b.step) == 2 * n
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert read_metrics(str(resumed)) == read_metrics(str(straight))
