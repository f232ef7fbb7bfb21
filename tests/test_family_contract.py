"""A family is one module and one registry line: a family defined in this file (which is
also its experiment file) trains, samples, evaluates and resumes through the real `t2i`
command line, with no edit anywhere else; and the contract refuses broken families.

ColourField, the family: from the caption's pooled features a Dense layer predicts a
coarse 4x4 RGB field, upsampled to the image; the loss is the mean squared error to the
image. It samples the field plus `temperature` times Gaussian noise, and reconstructs
nothing (no `reconstruct` hook), so `t2i reconstruct` must refuse it.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from t2i_jax import presets
from t2i_jax.errors import ConfigError
from t2i_jax.methods import registry
from t2i_jax.methods.base import (
    Method,
    SampleOption,
    TrainState,
    check_contract,
    next_state,
)
from t2i_jax.optim import make_optimizer
from t2i_jax.train.logging import read_metrics

THIS_FILE = os.path.abspath(__file__)


def get_config(arg=None) -> ml_collections.ConfigDict:
    """The family's experiment (`--config tests/test_family_contract.py`)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "colour_field"
    c.data = presets.shapes_data("test")
    c.text = presets.text("test")
    c.text.encoder = "bow"
    c.colour_field = ml_collections.ConfigDict({"grid": 4, "temperature": 0.0})
    c.optim = presets.adamw(1e-2, warmup_steps=0)
    # Constant learning rate: a run of 3 steps continued to 6 then equals a 6-step run.
    c.optim.schedule = "constant"
    c.train = presets.train("test")
    c.train.log_every = 1
    c.sample = presets.samples("test")
    return c


class _Head(nn.Module):
    grid: int

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        field = nn.Dense(self.grid * self.grid * 3)(pooled)
        return field.reshape(pooled.shape[0], self.grid, self.grid, 3)


class ColourField(Method):
    curves = ("loss",)
    sample_options = (SampleOption("temperature", float, "noise std", "colour_field.temperature"),)

    @classmethod
    def check_config(cls, config):
        if config.data.image_size % config.colour_field.grid:
            raise ConfigError("colour_field.grid must divide data.image_size")

    def __init__(self, config, text):
        super().__init__(config, text)
        self.head = _Head(config.colour_field.grid)
        self.optimizer = make_optimizer(config.optim, config.train.steps)
        self.factor = config.data.image_size // config.colour_field.grid

    def _image(self, model, frozen, batch) -> jax.Array:
        text_params = self.conditioner.params(model, frozen)
        pooled = self.conditioner.features(text_params, batch).pooled
        field = self.head.apply({"params": model["head"]}, pooled)
        return jnp.repeat(jnp.repeat(field, self.factor, axis=1), self.factor, axis=2)

    def init(self, rng, batch, frozen=None):
        k_text, k_head = jax.random.split(rng)
        model = self.conditioner.init(k_text, batch["tokens"], batch["mask"])
        text_params = self.conditioner.params(model, frozen)
        pooled = self.conditioner.encode(text_params, batch["tokens"], batch["mask"]).pooled
        model["head"] = self.head.init(k_head, pooled)["params"]
        return self.new_state({"model": model}, {"model": self.optimizer})

    def train_step(self, state, batch, rng, frozen=None):
        def loss_fn(model, examples, rows):
            del rows  # no random draws
            image = self._image(model, frozen, examples)
            return jnp.mean(jnp.square(image - examples["image"])), None

        update = self.update(
            loss_fn, state.params["model"], state.opt_state["model"], self.optimizer, batch
        )
        new = next_state(state, {"model": update.params}, {"model": update.opt_state}, 0.9)
        return new, {"loss": update.loss, "grad_norm": update.grad_norm}

    def sample(self, params, captions, rng, frozen=None, *, temperature=None):
        temperature = self.config.colour_field.temperature if temperature is None else temperature
        image = self._image(params["model"], frozen, captions)
        return jnp.clip(image + temperature * jax.random.normal(rng, image.shape), -1.0, 1.0)


@pytest.fixture
def family():
    registry.METHODS["colour_field"] = lambda: ColourField  # the one registry line
    yield
    del registry.METHODS["colour_field"]


def _t2i(*args: str) -> int:
    from t2i_jax import cli

    return cli.main(list(args))


def _train(workdir, data_dir, *extra) -> int:
    return _t2i(
        "train", "--config", THIS_FILE, "--workdir", str(workdir), "--no-progress",
        f"--config.data.dir={data_dir}", *extra,
    )  # fmt: skip


def _log(workdir) -> list[dict]:
    return read_metrics(str(workdir))  # timings ("perf") aside


def test_a_family_in_one_file_trains_samples_evaluates_and_resumes(
    family, tmp_path, evaluators_trained, capsys
):
    data_dir = evaluators_trained
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(straight, data_dir) == 0
    losses = [row["loss"] for row in _log(straight)]
    assert losses[-1] < losses[0]  # it learns the captions' colours
    assert os.path.isfile(straight / "report.md")

    # Resume: stopped after 3 of 6 steps (checkpoint_every=3), then continued.
    assert _train(resumed, data_dir, "--config.train.steps=3") == 0
    assert _train(resumed, data_dir) == 0
    assert _log(resumed) == _log(straight)

    # Sample through the CLI, with the family's declared option, and through the API.
    out = tmp_path / "grid.png"
    prompts = ["a large red circle in the center", "a small blue square in the top left"]
    args = ["sample", "--workdir", str(straight), "--num", "2", "--out", str(out)]
    assert _t2i(*args, "--prompt", prompts[0], "--prompt", prompts[1], "--temperature", "0") == 0
    import t2i_jax

    pipe = t2i_jax.Pipeline.from_workdir(str(straight))
    images = pipe(prompts, num=2, seed=0, output="numpy", temperature=0.0)
    assert images.shape == (2, 2, 32, 32, 3)
    # temperature 0: both samples of a prompt are the prompt's field; prompts differ.
    np.testing.assert_array_equal(images[:, 0], images[:, 1])
    assert np.abs(images[0, 0].astype(int) - images[1, 0].astype(int)).max() > 0
    noisy = pipe(prompts, num=2, seed=0, output="numpy", temperature=0.5)
    assert np.abs(noisy[:, 0].astype(int) - noisy[:, 1].astype(int)).max() > 0

    # An option the family does not declare is one line and exit 2.
    capsys.readouterr()
    assert _t2i(*args, "--prompt", prompts[0], "--guidance", "2") == 2
    assert "--guidance does not apply to a colour_field run" in capsys.readouterr().err

    # Evaluate: the run's sample options are recorded as the family declares them.
    assert _t2i("eval", "--workdir", str(straight), "--num", "8") == 0
    with open(straight / "eval" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["sample_options"] == {"temperature": 0.0}
    assert 0.0 <= metrics["splits"]["validation"]["generated"]["r_precision"] <= 1.0

    # No reconstruct hook: `t2i reconstruct` refuses it.
    capsys.readouterr()
    recon = ["reconstruct", "--workdir", str(straight), "--out", str(tmp_path / "r.png")]
    assert _t2i(*recon) == 2
    assert "nothing to reconstruct" in capsys.readouterr().err


def test_the_family_check_runs_before_anything_is_written(family, tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, data_dir, "--config.colour_field.grid=5") == 2
    assert "colour_field.grid must divide data.image_size" in capsys.readouterr().err
    assert not os.path.exists(workdir / "config.json")


def test_an_unregistered_family_is_a_config_error(tmp_path, data_dir, capsys):
    assert _train(tmp_path / "run", data_dir) == 2
    assert "unknown method 'colour_field'" in capsys.readouterr().err


def test_the_contract_refuses_a_misspelt_hook():
    with pytest.raises(TypeError, match="validation_stat.*looks like the hook 'validation_stats'"):

        class Misspelt(ColourField):
            def validation_stat(self, params, batch, rng, frozen=None):
                return {}


def test_the_contract_refuses_a_hook_with_other_arguments():
    with pytest.raises(TypeError, match="train_step"):

        class NoFrozen(ColourField):
            def train_step(self, state, batch, rng):
                return state, {}


def test_the_contract_refuses_half_a_validation():
    with pytest.raises(TypeError, match="validation_stats and validation_metrics go together"):

        class HalfValidation(ColourField):
            def validation_stats(self, params, batch, rng, frozen=None):
                return {}


def test_the_contract_refuses_an_option_sample_does_not_take():
    class Undeclared(ColourField):
        pass

    Undeclared.sample_options = (SampleOption("steps", int, "", "colour_field.grid"),)
    with pytest.raises(TypeError, match="declares 'steps'"):
        check_contract(Undeclared)


def test_optional_hooks_are_reported_by_the_contract():
    assert not ColourField.offers("reconstruct")
    assert not ColourField.offers("validation_stats")
    assert registry.method_class("vae").offers("reconstruct")
    assert registry.method_class("vqvae").offers("validation_stats")
    assert not registry.method_class("gan").offers("validation_stats")


def test_train_state_create_keeps_an_ema_only_of_the_named_players():
    params = {"g": {"w": jnp.ones(2)}, "d": {"w": jnp.zeros(3)}}
    tx = optax.sgd(0.1)
    state = TrainState.create(params, {"g": tx, "d": tx}, ema=["g"])
    assert set(state.ema_params) == {"g"} and set(state.opt_state) == {"g", "d"}
    later = next_state(state, {"g": {"w": jnp.zeros(2)}, "d": params["d"]}, state.opt_state, 0.5)
    # The warm-up rate at step 0 is min(0.5, 1/10) = 0.1: ema = 0.1 * 1 + 0.9 * 0.
    np.testing.assert_allclose(later.ema_params["g"]["w"], 0.1, rtol=1e-6)
    assert int(later.step) == 1
