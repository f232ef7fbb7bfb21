import json

import pytest
from helpers import EXPERIMENT

from t2i_jax import config as config_lib
from t2i_jax.errors import ConfigError


@pytest.mark.parametrize("variant", ["demo", "full", "test"])
def test_every_variant_has_the_required_keys(variant):
    config = config_lib.load_config(f"{EXPERIMENT}:{variant}")
    config_lib.validate(config)
    assert isinstance(config.seed, int)


def test_overrides_are_typed_by_the_current_value():
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    config_lib.apply_overrides(
        config,
        [
            "train.steps=17",
            "optim.lr=1",
            "diffusion.sampler=ddpm",
            "model.channel_mults=(1,2,4)",
            "diffusion.clip_denoised=False",
        ],
    )
    assert config.train.steps == 17
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.diffusion.sampler == "ddpm"
    assert config.model.channel_mults == (1, 2, 4)
    assert config.diffusion.clip_denoised is False


def test_unknown_key_names_the_key_and_suggests_a_fix():
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*'train.steps'"):
        config_lib.apply_overrides(config, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="unknown config key 'nothing.here'"):
        config_lib.apply_overrides(config, ["nothing.here=3"])


@pytest.mark.parametrize(
    "override", ["train.steps=ten", "train.steps=1.5", "seed=True", "diffusion.clip_denoised=1"]
)
def test_wrong_type_is_a_config_error(override):
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    with pytest.raises(ConfigError, match="expects"):
        config_lib.apply_overrides(config, [override])


def test_validate_rejects_bad_values_and_missing_keys():
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    config.train.steps = 0
    with pytest.raises(ConfigError, match="train.steps"):
        config_lib.validate(config)
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    del config.data["name"]
    with pytest.raises(ConfigError, match="data.name"):
        config_lib.validate(config)


def test_missing_file_and_unknown_variant(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config_lib.load_config(str(tmp_path / "nope.py"))
    with pytest.raises(ConfigError, match="unknown variant"):
        config_lib.load_config(f"{EXPERIMENT}:huge")


def test_json_round_trip_restores_tuples():
    config = config_lib.load_config(f"{EXPERIMENT}:demo")
    again = config_lib.from_json(config_lib.to_json(config))
    assert again.model.channel_mults == config.model.channel_mults
    assert json.loads(config_lib.to_json(again)) == json.loads(config_lib.to_json(config))
