"""Every experiment's `full` variant (accelerator-sized) lowers and compiles its train step
for abstract inputs on this CPU, and its memory on one device fits one 80 GB accelerator;
`t2i compile` reports a config's figures for any mesh.

Nothing is allocated: the state and frozen weights are shapes (train/preflight.py), so a
broken full config fails here rather than on a cluster. XLA's CPU memory analysis is an
estimate of a GPU's (other fusions, no cuDNN workspaces), hence a 64 GiB bound for an
80 GB device rather than 80.
"""

from __future__ import annotations

import json
import os

import jax
import pytest
from helpers import REPO, full_vae_config_run

from t2i_jax import cli
from t2i_jax import config as config_lib
from t2i_jax.train import preflight

# experiment file -> the image size its full variant promises
FULL = {
    "diffusion_shapes.py": 64,
    "gan_shapes.py": 64,
    "ldm_shapes.py": 256,
    "vae_shapes.py": 256,
    "vqvae_shapes.py": 64,
}
BUDGET = 64 * 2**30


def test_every_experiment_has_its_full_variant_here():
    experiments = {p for p in os.listdir(os.path.join(REPO, "experiments")) if p.endswith(".py")}
    assert experiments == set(FULL)


@pytest.mark.parametrize("experiment", sorted(FULL))
def test_full_variant_compiles_and_fits_one_device(experiment, data_dir, tmp_path):
    config = config_lib.load_config(os.path.join(REPO, "experiments", f"{experiment}:full"))
    assert config.data.image_size == FULL[experiment]
    assert config.train.compute_dtype == "bfloat16"
    config.data.dir = data_dir
    if config.method == "ldm":
        config.ldm.autoencoder = full_vae_config_run(tmp_path / "vae")
    text = preflight.stand_in_text(config, str(tmp_path))
    step = preflight.compile_train_step(config, text, jax.devices()[:1])
    size = config.data.image_size
    print(f"\n{experiment}:full ({size}px, batch {config.train.batch_size}): {step.summary()}")
    assert step.devices == 1
    # The inputs hold the whole state (params, EMA, optimizer moments: >= 12 bytes a param).
    assert step.state_bytes >= 12 * step.parameters
    assert step.argument_bytes >= step.state_bytes
    assert step.temp_bytes > 0 and step.flops > 0
    assert step.peak_bytes < BUDGET, step.summary()


def test_compile_command_reports_a_meshs_memory_per_device(data_dir, tmp_path, capsys):
    """`t2i compile` on the 8 simulated devices: 8-way data parallelism holds the whole
    state on every device (params, EMA and two Adam moments: 16 bytes a parameter, plus the
    step counters); FSDP over 8 about an eighth of it (a tensor with no dimension divisible
    by 8 stays replicated)."""
    config = os.path.join(REPO, "experiments", "diffusion_shapes.py:test")
    figures = {}
    for mesh in ("data", "fsdp"):
        out = tmp_path / f"{mesh}.json"
        argv = ["compile", "--config", config, "--json", str(out)]
        overrides = [f"--config.data.dir={data_dir}", "--config.mesh.min_shard_size=1"]
        overrides += [f"--config.mesh.{mesh}=8"] + (
            ["--config.mesh.data=1"] if mesh == "fsdp" else []
        )
        assert cli.main(argv + overrides) == 0
        assert "M params; per device: state" in capsys.readouterr().out
        figures[mesh] = json.loads(out.read_text())
    data, fsdp = figures["data"], figures["fsdp"]
    assert data["devices"] == fsdp["devices"] == 8
    assert data["parameters"] == fsdp["parameters"]
    assert data["flops"] == pytest.approx(fsdp["flops"], rel=0.01)
    assert 16 * data["parameters"] <= data["state_bytes"] < 16 * data["parameters"] + 1024
    assert data["state_bytes"] / 8 <= fsdp["state_bytes"] < data["state_bytes"] / 6
    for f in figures.values():
        assert f["peak_bytes"] == (
            f["argument_bytes"] + f["output_bytes"] + f["temp_bytes"] - f["alias_bytes"]
        )


def test_compile_command_refuses_more_devices_than_there_are(capsys):
    config = os.path.join(REPO, "experiments", "diffusion_shapes.py:test")
    assert cli.main(["compile", "--config", config, "--devices", "99"]) == 2
    assert capsys.readouterr().err.strip() == "t2i: error: --devices 99: this machine has 8"
