"""Grids (`t2i train`'s, `t2i sample`'s, the Python API's) are sampled with the batch split
over the parameters' devices, each device sampling its rows, and the images are those of
one device within float32 round-off."""

import jax
import numpy as np
import pytest
from helpers import build_method

from t2i_jax import sharding
from t2i_jax.runs.sampling import make_sampler, sample_images

PROMPTS = ["a large red circle in the center", "a small blue square at the top"]


@pytest.fixture(scope="module")
def diffusion(data_dir, tmp_path_factory):
    config, _, method, fns = build_method(
        "experiments/diffusion_shapes.py", data_dir, tmp_path_factory.mktemp("run")
    )
    params = jax.device_get(fns.init(jax.random.key(0)).ema_params)
    return config, method, params


def grid(diffusion, devices, per_prompt: int, sampler) -> np.ndarray:
    config, method, params = diffusion
    mesh = sharding.make_mesh(devices)
    placed = jax.device_put(params, sharding.replicated(mesh))
    return sample_images(
        sampler,
        placed,
        None,
        method.text_setup.tokenizer,
        PROMPTS,
        per_prompt=per_prompt,
        rng=jax.random.key(5),
        max_len=config.text.max_len,
    )


def recorded_sampler(method):
    """(the sampler, the sampler recording where its captions lie, those placements)."""
    sampler = make_sampler(method)
    calls = []

    def recording(params, text, key, frozen):
        calls.append(text["tokens"].sharding)
        return sampler(params, text, key, frozen)

    return sampler, recording, calls


def test_each_device_samples_its_rows_and_the_images_are_one_devices(diffusion):
    _, method, _ = diffusion
    sampler, recording, calls = recorded_sampler(method)
    devices = jax.devices()[:4]
    split = grid(diffusion, devices, per_prompt=2, sampler=recording)  # 4 rows on 4 devices
    spec = calls[-1].spec
    assert calls[-1].mesh.devices.size == 4 and spec and spec[0] == sharding.BATCH_AXES
    one = grid(diffusion, jax.devices()[:1], per_prompt=2, sampler=sampler)
    assert split.shape == one.shape == (2, 2, 32, 32, 3)
    # Same noise on any split (partitionable threefry); the convolutions' sums may round
    # differently per device batch size, so a uint8 pixel may land one level off.
    assert np.abs(split.astype(int) - one.astype(int)).max() <= 1
    assert np.mean(split != one) < 0.01


def test_rows_that_do_not_divide_the_devices_are_sampled_whole_on_each(diffusion):
    _, method, _ = diffusion
    sampler, recording, calls = recorded_sampler(method)
    odd = grid(diffusion, jax.devices()[:4], per_prompt=3, sampler=recording)  # 6 rows, 4 devices
    assert calls[-1].is_fully_replicated
    one = grid(diffusion, jax.devices()[:1], per_prompt=3, sampler=sampler)
    assert np.abs(odd.astype(int) - one.astype(int)).max() <= 1
