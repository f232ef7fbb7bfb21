"""Every experiment's `full` variant (accelerator-sized) lowers its train step for abstract
inputs on this CPU with a state that fits one 80 GB accelerator; `t2i compile` compiles
one and reports its figures; every one compiles and fits (slow, and
`benchmarks/full_configs.py`).

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
    "diffusion_digits.py": 32,  # the data's own size (8x8 scans)
    "diffusion_shapes.py": 64,
    "gan_shapes.py": 64,
    "ldm_shapes.py": 256,
    "vae_shapes.py": 256,
    "vqvae_shapes.py": 64,
}
BUDGET = 64 * 2**30
COMMAND = "gan_shapes.py"  # the one compiled through `t2i compile`
IMPORTED = "images.py"  # every family on imported data, with the full variants above


def test_every_experiment_has_its_full_variant_here():
    experiments = {p for p in os.listdir(os.path.join(REPO, "experiments")) if p.endswith(".py")}
    assert experiments == set(FULL) | {IMPORTED}


@pytest.mark.parametrize("family", ["diffusion", "gan", "vae", "vqvae", "ldm"])
def test_imported_images_full_variant_is_its_familys_on_other_data(family):
    """`images.py:FAMILY-full` is FAMILY's full experiment (compiled above) with the data,
    the tokenizer's size and the grid prompts replaced, so it needs no compile of its own."""
    path = os.path.join(REPO, "experiments", IMPORTED)
    own = config_lib.load_config(f"{path}:{family}-full")
    base_file = f"{family}_shapes.py"
    base = config_lib.load_config(os.path.join(REPO, "experiments", f"{base_file}:full"))
    assert own.data.image_size == FULL[base_file]
    assert own.data.name == "images" and base.data.name == "t2i_shapes"
    replaced = {"data", "sample", "text"}
    if family == "ldm":
        replaced.add("ldm")
    plain = lambda value: value.to_dict() if hasattr(value, "to_dict") else value  # noqa: E731
    for key in set(base.keys()) - replaced:
        assert plain(own[key]) == plain(base[key]), key
    assert own.text.encoder == base.text.encoder and own.text.max_len >= base.text.max_len


def full_config(experiment: str, data_dir: str, tmp_path):
    path = os.path.join(REPO, "experiments", f"{experiment}:full")
    config = config_lib.load_config(path)
    assert config.data.image_size == FULL[experiment]
    assert config.train.compute_dtype == "bfloat16"
    config.data.dir = data_dir
    if config.method == "ldm":
        config.ldm.autoencoder = full_vae_config_run(tmp_path / "vae")
    return config


def check_state_size(step) -> None:
    # The inputs hold the whole state: params and two Adam moments in float32 (12 bytes a
    # parameter), the EMA of those that sample (+4; a GAN's generator only, a VQ-VAE's
    # codebook has no Adam moments), and step counters.
    assert 8 * step.parameters < step.state_bytes <= 16 * step.parameters + 1024
    assert step.flops > 0


@pytest.mark.parametrize("experiment", sorted(FULL))
def test_full_variant_lowers_for_one_device(experiment, data_dir, tmp_path):
    """Tracing the sharded step for abstract inputs checks every shape, dtype and
    sharding of the config in seconds; XLA's compile of it takes a minute or more each
    (`benchmarks/full_configs.py` and the slow test below compile them all)."""
    config = full_config(experiment, data_dir, tmp_path)
    text = preflight.stand_in_text(config, str(tmp_path))
    step = preflight.lower_train_step(config, text, jax.devices()[:1])
    assert step.devices == 1
    check_state_size(step)
    assert step.state_bytes < BUDGET


def check_compiled(step, experiment: str, config, capsys) -> None:
    with capsys.disabled():
        size, batch = config.data.image_size, config.train.batch_size
        print(f"\n{experiment}:full ({size}px, batch {batch}): {step.summary()}")
    assert step.devices == 1
    check_state_size(step)
    assert step.argument_bytes >= step.state_bytes
    assert step.temp_bytes > 0
    assert step.peak_bytes < BUDGET, step.summary()


def test_compile_command_compiles_a_full_variant_that_fits_one_device(data_dir, tmp_path, capsys):
    """`t2i compile --devices 1` on the GAN's full variant (the quickest to compile): XLA's
    memory analysis under the budget, and the summary line it prints."""
    config = full_config(COMMAND, data_dir, tmp_path)
    path = os.path.join(REPO, "experiments", f"{COMMAND}:full")
    out = tmp_path / "compiled.json"
    argv = ["compile", "--config", path, "--devices", "1", "--json", str(out)]
    assert cli.main([*argv, f"--config.data.dir={data_dir}"]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"{path} data.dir={data_dir}: ")
    step = preflight.CompiledStep(**{
        k: v for k, v in json.loads(out.read_text()).items() if k != "peak_bytes"
    })  # fmt: skip
    assert summary.endswith(step.summary())
    check_compiled(step, COMMAND, config, capsys)


# Covered in `make test` by the lowering of every full variant and the compile of one
# (above); `python benchmarks/full_configs.py` compiles them all and fails over budget.
@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(set(FULL) - {COMMAND}))
def test_full_variant_compiles_and_fits_one_device(experiment, data_dir, tmp_path, capsys):
    config = full_config(experiment, data_dir, tmp_path)
    text = preflight.stand_in_text(config, str(tmp_path))
    step = preflight.compile_train_step(config, text, jax.devices()[:1])
    check_compiled(step, experiment, config, capsys)


def test_compile_command_refuses_more_devices_than_there_are(capsys):
    config = os.path.join(REPO, "experiments", "diffusion_shapes.py:test")
    assert cli.main(["compile", "--config", config, "--devices", "99"]) == 2
    assert capsys.readouterr().err.strip() == "t2i: error: --devices 99: this machine has 8"
