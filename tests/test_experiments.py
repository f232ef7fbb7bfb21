"""Every variant of every experiment file loads, passes the checks a run starts with, and
builds a method whose initial state `jax.eval_shape` can trace: shapes only, nothing
computed, nothing allocated, so the `full` variants cost what the `test` ones do."""

import glob
import math
import os

import flax.linen as nn
import jax
import ml_collections
import pytest
from helpers import REPO, full_vae_config_run, untrained_vae_run

from t2i_jax import config as config_lib
from t2i_jax import sharding
from t2i_jax.data import sources
from t2i_jax.eval.ablate import load_sweep, run_configs
from t2i_jax.methods import registry
from t2i_jax.runs.loading import batch_spec
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext

EXPERIMENTS = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
)
SWEEPS = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(REPO, "experiments", "sweeps", "*.py"))
)
VARIANTS = ("test", "demo", "full")
# experiments/images.py takes FAMILY-VARIANT (a family's network on imported data).
IMAGE_FAMILIES = ("diffusion", "gan", "vae", "vqvae", "ldm_vae", "ldm")
CASES = [(e, None) for e in EXPERIMENTS if e != "images.py"] + [
    ("images.py", f) for f in IMAGE_FAMILIES
]


def load(experiment: str, variant: str):
    return config_lib.load_config(f"{os.path.join(REPO, 'experiments', experiment)}:{variant}")


def test_the_experiments_are_found():
    """The globs above see the files (an empty parametrization would pass silently)."""
    assert {"diffusion_shapes.py", "gan_shapes.py", "ldm_shapes.py"} <= set(EXPERIMENTS)
    assert {"vae_shapes.py", "vqvae_shapes.py", "images.py"} <= set(EXPERIMENTS)
    assert {"gan_objectives.py", "text_encoders.py"} <= set(SWEEPS)


@pytest.fixture(scope="module")
def vae_run(data_dir, tmp_path_factory) -> str:
    return untrained_vae_run(data_dir, tmp_path_factory.mktemp("ldm_vae"))


@pytest.fixture(scope="module")
def text_context(data_dir, tmp_path_factory) -> TextContext:
    """Where each variant's text side trains its tokenizer (once: every variant has the same
    vocab_size): the small data set's captions, whatever data set the variant names, so no
    variant's data is built here. The tokenizer only sizes the text encoder's embedding."""
    builder = sources.prepare("t2i_shapes", data_dir, "small")
    return TextContext(str(tmp_path_factory.mktemp("text")), builder, seed=0)


def abstract_init(config, text_context, *, check: bool = True):
    """(method, its frozen weights' shapes, the abstract TrainState of `method.init` at the
    variant's batch size, with its logical-axis boxes). `check`: the checks a run starts
    with (they read the files another run must have written)."""
    config_lib.validate(config)
    if check:
        registry.check_names(config)
    method = registry.build_method(config, build_text(config, text_context))
    frozen = method.frozen_shapes()
    boxed = jax.eval_shape(method.init, jax.random.key(0), batch_spec(config), frozen)
    return method, frozen, boxed


def check_fsdp_annotations(boxed_params, variant: str) -> None:
    """Every kernel and table of MIN_SHARD_SIZE elements or more names its logical axes,
    and on an 8-way fsdp mesh one of its dimensions is split 8 ways."""
    mesh = sharding.make_mesh(jax.devices(), ml_collections.ConfigDict({"mesh": {"fsdp": 8}}))
    is_box = lambda x: isinstance(x, nn.Partitioned)
    leaves = jax.tree_util.tree_leaves_with_path(boxed_params, is_leaf=is_box)
    specs = sharding.state_shardings(boxed_params, mesh)
    large = 0
    for (path, leaf), spec in zip(leaves, jax.tree.leaves(specs), strict=True):
        value = leaf.value if is_box(leaf) else leaf
        if value.size < sharding.MIN_SHARD_SIZE:
            continue
        large += 1
        name = f"{variant}: {jax.tree_util.keystr(path)} {value.shape}"
        assert is_box(leaf), f"no logical axes: {name}"
        assert "fsdp" in spec.spec, f"not sharded: {name}"
    assert large > 0, variant


def param_count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(("experiment", "family"), CASES)
def test_every_variant_builds_and_initialises(experiment, family, request, text_context, tmp_path):
    counts = {}
    for variant in VARIANTS:
        config = load(experiment, f"{family}-{variant}" if family else variant)
        method_name = {"ldm_vae": "vae"}.get(family, family) or experiment.split("_")[0]
        assert config.method == method_name, variant
        if family:  # imported data: the check wants the data set there; none is made here
            config.data.name = "t2i_shapes"
        check = True
        if config.method == "ldm" and variant == "full":
            # 256 px over vae_shapes.py:full, whose run here is its config alone: the
            # start-of-run check wants its checkpoint (test_full_configs.py compiles it).
            config.ldm.autoencoder = full_vae_config_run(tmp_path / "vae_full")
            check = False
        elif config.method == "ldm":
            config.ldm.autoencoder = request.getfixturevalue("vae_run")
        method, frozen, boxed = abstract_init(config, text_context, check=check)
        state = nn.unbox(boxed)
        if variant != "test":  # the test variant's networks are mostly below the threshold
            check_fsdp_annotations(boxed.params, variant)
        leaves = jax.tree.leaves(state.params)
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), variant
        assert all(math.prod(x.shape) > 0 for x in leaves), variant
        # The EMA copies (a GAN's: the generator only) are of trained networks; every
        # family has an optimizer state to restore.
        assert set(state.ema_params) <= set(state.params), variant
        assert jax.tree.leaves(state.opt_state), variant
        counts[variant] = param_count(state.params)
        if config.method == "ldm":
            # The UNet denoises the autoencoder's latents, not pixels: it reads and writes
            # latent_channels, on the latent grid.
            channels = method.vae.latent_shape[-1]
            unet = state.params["model"]["unet"]
            assert unet["conv_in"]["kernel"].shape[2] == channels, variant
            assert unet["conv_out"]["kernel"].shape[3] == channels, variant
            side = {32: 8, 256: 32}[config.data.image_size]  # f=4 at 32 px, f=8 at 256
            assert method.sample_shape == tuple(method.vae.latent_shape) == (side, side, channels)
            # The autoencoder is frozen: its weights are the run's frozen ones, not state.
            assert "autoencoder" not in state.params["model"], variant
            assert param_count(frozen["autoencoder"]) > 0
        elif config.text.encoder == "bert" and not config.text.finetune:
            # The frozen pretrained text encoder (the diffusion demo's): the run's frozen
            # weights, not state.
            assert set(frozen) == {"text_encoder"}, variant
            assert param_count(frozen["text_encoder"]) > 0
            assert "text_encoder" not in state.params["model"], variant
        else:
            assert frozen == {}, variant  # nothing else pretrained in these experiments
    # `full` is the accelerator's larger model; `test` the smallest.
    assert counts["full"] > counts["demo"] > counts["test"], counts


@pytest.mark.parametrize("sweep", SWEEPS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_sweep_run_config_passes_the_checks(sweep, variant):
    """`t2i ablate` checks every run's config before the first trains: each must pass."""
    spec = f"{os.path.join(REPO, 'experiments', 'sweeps', sweep)}:{variant}"
    sweep_dict = load_sweep(spec)
    configs = run_configs(sweep_dict, [])
    assert list(configs) == list(sweep_dict["runs"]) and len(configs) >= 2
    for name, config in configs.items():
        for key, value in sweep_dict["runs"][name].items():
            if key != "base":  # the run's own experiment; `{run:NAME}` stays until it runs
                assert config_lib.flatten(config)[key] == value
