"""VQ-VAE with its code prior: the codebook's EMA step inside training, gradients kept
apart, learning on a fixed batch, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import build_method, real_batch

from t2i_jax import config as config_lib
from t2i_jax.errors import ConfigError
from t2i_jax.methods import registry
from t2i_jax.methods import vector_quantizer as vq
from t2i_jax.metrics import lpips
from t2i_jax.nets import lpips_backbones

VQ_EXPERIMENT = "experiments/vqvae_shapes.py"


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vq")
    return build_method(VQ_EXPERIMENT, data_dir, workdir, **{"optim.lr": 2e-3})


def test_the_codebook_moves_by_its_ema_update_only(built):
    config, builder, method, fns = built
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    before = jax.device_get(state.params["model"])
    key = jax.random.key(1)
    new_state, metrics = fns.train_step(state, batch, key)
    # Recompute the step's codebook update by hand from the old params.
    terms = method.autoencode(before, batch["image"])
    flat = terms["z_e"].reshape(-1, config.vqvae.code_dim)
    vc = config.vqvae
    expected = vq.ema_update(
        before["codebook"], flat, terms["codes"].reshape(-1), decay=vc.ema_decay, eps=vc.ema_eps
    )
    expected, restarted = vq.restart_dead_codes(
        expected, flat, jax.random.split(key)[1], threshold=vc.dead_code_threshold
    )
    got = new_state.params["model"]["codebook"]
    for name in ("codebook", "cluster_size", "embed_sum"):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(expected[name]), rtol=1e-5)
    assert float(metrics["codes_restarted"]) == float(restarted)
    # Sampling uses the live codebook, not an average of it.
    np.testing.assert_array_equal(
        np.asarray(new_state.ema_params["model"]["codebook"]["codebook"]),
        np.asarray(got["codebook"]),
    )


def test_prior_start_holds_the_prior_until_its_step(data_dir, tmp_path):
    """Before vqvae.prior_start neither the prior nor the text encoder (which only the prior
    reads) moves; the autoencoder does. From that step on, the prior learns."""
    config, builder, method, fns = build_method(
        VQ_EXPERIMENT, data_dir, tmp_path, **{"vqvae.prior_start": 2}
    )
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    snapshots = [jax.device_get(state.params["model"])]
    for step in range(3):
        state, _ = fns.train_step(state, batch, jax.random.key(step))
        snapshots.append(jax.device_get(state.params["model"]))

    def same(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return all(np.array_equal(x, y) for x, y in pairs)

    for part in ("prior", "text_encoder"):  # steps 0 and 1: held
        assert same(snapshots[0][part], snapshots[2][part]), part
        assert not same(snapshots[2][part], snapshots[3][part]), part  # step 2: learns
    assert not same(snapshots[0]["encoder"], snapshots[2]["encoder"])  # (step 0: warm-up lr 0)


def test_training_lowers_reconstruction_and_prior_loss_on_a_fixed_batch(built):
    config, builder, method, fns = built
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    history = []
    for step in range(40):
        state, metrics = fns.train_step(state, batch, jax.random.key(step))
        history.append({k: float(v) for k, v in metrics.items()})
    assert all(np.isfinite(v) for m in history for v in m.values())
    assert history[-1]["recon"] < 0.5 * history[0]["recon"]
    assert history[-1]["prior_loss"] < history[0]["prior_loss"]
    assert history[-1]["perplexity"] > 1.5  # the codebook has not collapsed to one code

    text = {"tokens": batch["tokens"][:3], "mask": batch["mask"][:3]}
    sample = jax.jit(method.sample)
    a = sample(state.ema_params, text, jax.random.key(5))
    b = sample(state.ema_params, text, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (3, 32, 32, 3) and float(jnp.max(jnp.abs(a))) <= 1.0
    recon = jax.jit(method.reconstruct)(state.ema_params, batch)
    assert recon.shape == batch["image"].shape


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vqvae.num_codes": 0}, "vqvae.num_codes must be a positive int"),
        ({"vqvae.top_p": 0.0}, r"vqvae sampling: top_p must be in \(0, 1\]"),
        ({"vqvae.top_k": 17}, r"vqvae sampling: top_k must be in \[0, 16\]"),
        ({"vqvae.prior_width": 15}, "not divisible by vqvae.prior_heads=2"),
        ({"vqvae.ema_decay": 1.0}, r"vqvae.ema_decay must be in \[0, 1\)"),
        ({"vqvae.perceptual_weight": -1.0}, "vqvae.perceptual_weight must be >= 0"),
        ({"vqvae.perceptual_weight": 1.0}, "needs vqvae.perceptual_backbone: .*vgg16-397923af"),
        (
            {"vqvae.perceptual_weight": 1.0, "vqvae.perceptual_backbone": "no/vgg16.pth"},
            "vqvae.perceptual_backbone: no file at no/vgg16.pth",
        ),
    ],
)
def test_bad_vqvae_sections_are_config_errors(overrides, message):
    config = config_lib.load_config(f"{VQ_EXPERIMENT}:test")
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    with pytest.raises(ConfigError, match=message):
        registry.check_names(config)


def test_perceptual_term_is_lpips_vgg_of_the_reconstruction(data_dir, tmp_path):
    """With vqvae.perceptual_weight the loss gains weight * LPIPS-vgg(x, dec(z_q)), computed
    as the metric computes it, and the LPIPS network stays fixed."""
    from safetensors.numpy import save_file

    backbone = tmp_path / "vgg16.safetensors"  # random weights: ImageNet's are not shipped
    vgg = lpips_backbones.random_backbone_params("vgg", seed=0)
    save_file(lpips_backbones.state_dict_from_params("vgg", vgg), str(backbone))
    weight = 0.5
    config, builder, method, fns = build_method(
        VQ_EXPERIMENT,
        data_dir,
        tmp_path,
        **{"vqvae.perceptual_weight": weight, "vqvae.perceptual_backbone": str(backbone)},
    )
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    model = jax.device_get(state.params["model"])
    terms = method.autoencode(model, batch["image"])
    decoded = method.decode_codes(model, terms["codes"])
    expected = lpips.lpips_distance(lpips.load_lpips("vgg", str(backbone)), decoded, batch["image"])
    np.testing.assert_allclose(np.asarray(terms["perceptual"]), np.asarray(expected), rtol=1e-5)
    assert float(jnp.min(expected)) > 0

    new_state, metrics = fns.train_step(state, batch, jax.random.key(1))
    m = {k: float(v) for k, v in metrics.items()}
    c = config.vqvae.commitment
    total = m["recon"] + c * m["commitment"] + weight * m["perceptual"] + m["prior_loss"]
    np.testing.assert_allclose(m["loss"], total, rtol=1e-5)
    np.testing.assert_allclose(m["perceptual"], float(jnp.mean(expected)), rtol=1e-5)
    before, after = model["lpips"], jax.device_get(new_state.params["model"]["lpips"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
