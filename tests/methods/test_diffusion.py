import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import sharding
from t2i_jax.data import sources
from t2i_jax.methods import registry, text_conditioning
from t2i_jax.text.encoders import build_text
from t2i_jax.text.setup import TextContext
from t2i_jax.train import loop

VOCAB = 64  # Random batches draw ids below this; the test tokenizer has more.


def build_method(config, tmp_path):
    """The config's method with its text side (tokenizer trained on the test data)."""
    builder = sources.prepare(config.data.name, config.data.dir, config.data.variant)
    text = build_text(config, TextContext(str(tmp_path), builder, config.seed))
    assert text.vocab_size > VOCAB
    return registry.build_method(config, text)


def random_batch(config, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    b, size, length = config.train.batch_size, config.data.image_size, config.text.max_len
    tokens = jax.random.randint(k2, (b, length), 3, VOCAB)
    lengths = jnp.arange(b) % (length - 2) + 2
    mask = jnp.arange(length)[None] < lengths[:, None]
    return {
        "image": jax.random.uniform(k1, (b, size, size, 3), minval=-1, maxval=1),
        "tokens": jnp.where(mask, tokens, 0).astype(jnp.int32),
        "mask": mask,
    }


def run_steps(config, devices, tmp_path, steps=3):
    method = build_method(config, tmp_path)
    fns = loop.compile_functions(method, config, sharding.make_mesh(devices))
    state = fns.init(jax.random.key(0))
    initial = jax.device_get(state.params)
    history = []
    for i in range(steps):
        batch = jax.device_put(random_batch(config, i), fns.batch_sharding)
        state, metrics = fns.train_step(state, batch, jax.random.key(100 + i))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history, initial


# Slow: tests/train/test_fsdp.py splits the batch 8 ways (and the state) against one device
# and tests/train/test_multiprocess.py compares two 8-device data-parallel runs.
@pytest.mark.slow
def test_train_step_on_8_devices_matches_1_device(test_config, tmp_path):
    assert len(jax.devices()) == 8
    one, m1, initial = run_steps(test_config, jax.devices()[:1], tmp_path)
    eight, m8, _ = run_steps(test_config, jax.devices(), tmp_path)
    # Same math, different reduction order across devices: float32 round-off only.
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert int(eight.step) == 3
    moved = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(initial), strict=True)
    ]
    # Zero-initialised output layers pass gradients on one layer per step, so after 3
    # steps about a quarter of the leaves have moved: enough to make the check above real.
    assert np.mean(moved) > 0.2


def test_loss_decreases_on_a_fixed_batch(test_config, tmp_path):
    test_config.optim.lr = 3e-3
    method = build_method(test_config, tmp_path)
    fns = loop.compile_functions(method, test_config, sharding.make_mesh(jax.devices()[:1]))
    state = fns.init(jax.random.key(0))
    batch = random_batch(test_config)
    # Flat colours: learnable in a few steps, unlike the uniform noise of random_batch.
    batch["image"] = jnp.broadcast_to(batch["image"][:, :1, :1], batch["image"].shape)
    batch = jax.device_put(batch, fns.batch_sharding)
    key = jax.random.key(5)
    loss_fn = jax.jit(lambda p: jnp.mean(method.loss_terms(p, batch, key)))
    loss = lambda s: float(loss_fn(s.params["model"]))
    before = loss(state)
    for i in range(30):
        state, _ = fns.train_step(state, batch, jax.random.fold_in(key, i))
    assert loss(state) < 0.8 * before


def test_caption_dropout():
    tokens = jnp.array([[5, 6, 2, 0], [7, 2, 0, 0], [8, 9, 10, 2]], jnp.int32)
    mask = tokens != 0
    null_tokens, null_mask = jnp.array([[2, 0, 0, 0]]), jnp.array([[True, False, False, False]])
    drop = jnp.array([False, True, False])
    out_tokens, out_mask = text_conditioning.drop_captions(
        drop, tokens, mask, null_tokens, null_mask
    )
    np.testing.assert_array_equal(out_tokens, [[5, 6, 2, 0], [2, 0, 0, 0], [8, 9, 10, 2]])
    np.testing.assert_array_equal(out_mask, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sample_shapes_range_and_determinism(test_config, prediction, tmp_path):
    test_config.diffusion.prediction = prediction
    method = build_method(test_config, tmp_path)
    state = jax.jit(method.init)(jax.random.key(0), random_batch(test_config))
    # Perturb the zero-initialised output layer so samples depend on the text.
    params = jax.tree.map(
        lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), state.params
    )
    text = {k: v[:4] for k, v in random_batch(test_config).items() if k != "image"}
    sample = jax.jit(method.sample, static_argnames=("guidance", "steps", "sampler", "eta"))
    a = np.asarray(sample(params, text, jax.random.key(1)))
    b = np.asarray(sample(params, text, jax.random.key(1)))
    assert a.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(a, b)  # same seed, same images
    assert not np.allclose(a, np.asarray(sample(params, text, jax.random.key(2))), atol=1e-3)
    other = {k: jnp.roll(v, 1, axis=0) for k, v in text.items()}  # each row another caption
    assert not np.allclose(a, np.asarray(sample(params, other, jax.random.key(1))), atol=1e-3)
    guided = np.asarray(sample(params, text, jax.random.key(1), guidance=1.0))
    unguided_ddpm = sample(params, text, jax.random.key(1), guidance=1.0, sampler="ddpm")
    assert not np.allclose(a, guided) and not np.allclose(guided, unguided_ddpm)
    if prediction == "v":  # An ODE sampler through the network: Heun tells it fractional
        # timesteps (Karras sigmas); its arithmetic is test_samplers.py's.
        heun = np.asarray(sample(params, text, jax.random.key(1), sampler="heun"))
        assert heun.shape == a.shape and np.all(np.abs(heun) <= 1.0)
        assert not np.allclose(heun, a, atol=1e-3)
    # Guidance 0 is the unconditional model: the empty caption's samples, unguided.
    null_tokens, null_mask = method.text_setup.tokenizer.empty(test_config.text.max_len)
    empty = {
        "tokens": jnp.repeat(jnp.asarray(null_tokens), 4, axis=0),
        "mask": jnp.repeat(jnp.asarray(null_mask), 4, axis=0),
    }
    unconditional = np.asarray(sample(params, text, jax.random.key(1), guidance=0.0))
    # (a batch of 2B against one of B: float32 round-off, grown by the sampler's steps)
    empty_captions = np.asarray(sample(params, empty, jax.random.key(1), guidance=1.0))
    difference = np.abs(unconditional - empty_captions)
    assert np.max(difference) < 1e-2 and np.mean(difference) < 1e-5
    assert np.mean(np.abs(unconditional - guided)) > 1e-2


class TargetUNet(nn.Module):
    """A stand-in for the UNet whose every prediction decodes to x0 = target(text), any x_t
    and t: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab), v = sqrt(ab) eps - sqrt(1 - ab) x0."""

    alpha_bar: np.ndarray
    prediction: str
    projection: np.ndarray

    @nn.compact
    def __call__(self, x_t, t, seq, mask, pooled, *, train=False):
        x0 = jnp.broadcast_to(target_colour(pooled, self.projection), x_t.shape)
        ab = jnp.asarray(self.alpha_bar, jnp.float32)[t.astype(jnp.int32)][:, None, None, None]
        eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
        if self.prediction == "eps":
            return eps
        return jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0


def target_colour(pooled, projection):
    """A colour per caption [B, 1, 1, 3] (numpy or jax)."""
    xp = jnp if isinstance(pooled, jax.Array) else np
    return (0.4 * xp.tanh(pooled @ projection))[:, None, None, :]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_guidance_mixes_the_conditional_and_unconditional_predictions(
    test_config, prediction, tmp_path
):
    """With a network whose prediction decodes to a known x0 per caption, every sampler
    ends on x0 = clip(x0_uncond + w (x0_cond - x0_uncond)): guidance is
    out_uncond + w (out_cond - out_uncond) on the network's output (linear in x0 for eps and
    v alike), cond on the captions, uncond on the empty caption."""
    test_config.diffusion.prediction = prediction
    method = build_method(test_config, tmp_path)
    batch = random_batch(test_config)
    text = {k: v[:4] for k, v in batch.items() if k != "image"}
    text_params = method.conditioner.init(jax.random.key(0), text["tokens"], text["mask"])
    encoder = method.conditioner.params(text_params, None)
    cond = np.asarray(method.conditioner.encode(encoder, text["tokens"], text["mask"]).pooled)
    null = np.asarray(method.conditioner.null(encoder, 4).pooled)
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(cond.shape[-1], 3)) * 3 / np.sqrt(cond.shape[-1])
    x0_cond = target_colour(np.float64(cond), projection)
    x0_uncond = target_colour(np.float64(null), projection)
    assert np.min(np.abs(x0_cond - x0_uncond)) > 1e-3
    method.unet = TargetUNet(np.asarray(method.alpha_bar), prediction, projection)
    params = {"model": {**text_params, "unet": {}}}
    sample = jax.jit(method.sample, static_argnames=("guidance", "steps", "sampler", "eta"))
    for w in (0.0, 1.0, 3.0):
        expected = np.clip(x0_uncond + w * (x0_cond - x0_uncond), -1.0, 1.0)
        expected = np.broadcast_to(expected, (4, 32, 32, 3))
        for options in ({}, {"sampler": "ddpm"}, {"steps": 1}) if w == 3.0 else ({},):
            got = np.asarray(sample(params, text, jax.random.key(1), guidance=w, **options))
            np.testing.assert_allclose(got, expected, atol=2e-4, err_msg=f"{w} {options}")
    assert np.any(np.abs(np.clip(x0_uncond + 3 * (x0_cond - x0_uncond), -1, 1)) == 1.0)
