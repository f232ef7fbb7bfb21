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
from t2i_jax.metrics import lpips
from t2i_jax.nets import lpips_backbones

VQ_EXPERIMENT = "experiments/vqvae_shapes.py"


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vq")
    # Laplace smoothing strong enough to show in the codebook (the default eps is 1e-5).
    return build_method(
        VQ_EXPERIMENT, data_dir, workdir, **{"optim.lr": 2e-3, "vqvae.ema_eps": 0.5}
    )


def test_the_codebook_moves_by_its_ema_update_only(built):
    """The step's codebook against the EMA written out in numpy (float64) from its
    definition: N_k <- d N_k + (1 - d) n_k, m_k <- d m_k + (1 - d) s_k, e_k = m_k / N~_k with
    Laplace smoothing N~_k = (N_k + eps) / (N + K eps) N; codes whose count falls below the
    threshold are restarted on one of the batch's encoder outputs."""
    config, builder, method, fns = built
    vc = config.vqvae
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    before = jax.device_get(state.params["model"])
    new_state, metrics = fns.train_step(state, batch, jax.random.key(1))
    got = jax.device_get(new_state.params["model"]["codebook"])

    # The encoder outputs of the step (the encoder's params before it) and their codes.
    z = np.asarray(method.encoder.apply({"params": before["encoder"]}, batch["image"]))
    z = z.reshape(-1, vc.code_dim).astype(np.float64)
    old = {k: np.asarray(v, np.float64) for k, v in before["codebook"].items()}
    distances = ((z[:, None, :] - old["codebook"][None]) ** 2).sum(-1)
    ranked = np.sort(distances, axis=1)
    assert np.all(ranked[:, 1] - ranked[:, 0] > 1e-5)  # no near ties: the codes are sure
    codes = np.argmin(distances, axis=1)
    k, d, eps = vc.num_codes, vc.ema_decay, vc.ema_eps
    n = np.bincount(codes, minlength=k).astype(np.float64)
    sums = np.zeros((k, vc.code_dim))
    np.add.at(sums, codes, z)
    size = d * old["cluster_size"] + (1 - d) * n
    embed_sum = d * old["embed_sum"] + (1 - d) * sums
    total = size.sum()
    smoothed = (size + eps) / (total + k * eps) * total
    codebook = embed_sum / smoothed[:, None]

    dead = size < vc.dead_code_threshold
    assert dead.any() and not dead.all()  # both kinds of code in this step
    live = ~dead
    np.testing.assert_allclose(got["cluster_size"][live], size[live], rtol=1e-5)
    np.testing.assert_allclose(got["embed_sum"][live], embed_sum[live], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["codebook"][live], codebook[live], rtol=1e-4, atol=1e-6)
    # A dead code sits on one of the batch's encoder outputs, with count = threshold and
    # the matching sum.
    assert float(metrics["codes_restarted"]) == dead.sum()
    np.testing.assert_array_equal(got["cluster_size"][dead], vc.dead_code_threshold)
    for row in got["codebook"][dead]:
        assert np.min(np.max(np.abs(z - row), axis=1)) < 1e-5
    np.testing.assert_allclose(
        got["embed_sum"][dead], vc.dead_code_threshold * got["codebook"][dead], rtol=1e-6
    )
    # Sampling uses the live codebook, not an average of it.
    np.testing.assert_array_equal(
        np.asarray(new_state.ema_params["model"]["codebook"]["codebook"]), got["codebook"]
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
    sample = jax.jit(method.sample, static_argnames=("temperature",))
    a = np.asarray(sample(state.ema_params, text, jax.random.key(5)))
    b = np.asarray(sample(state.ema_params, text, jax.random.key(5)))
    assert a.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(a, b)  # same seed, same images
    assert not np.array_equal(a, np.asarray(sample(state.ema_params, text, jax.random.key(6))))
    other = {k: jnp.roll(v, 1, axis=0) for k, v in text.items()}  # each row another caption
    assert not np.array_equal(a, np.asarray(sample(state.ema_params, other, jax.random.key(5))))
    # Temperature 0 decodes greedily: the seed no longer matters.
    greedy = [
        np.asarray(sample(state.ema_params, text, jax.random.key(s), temperature=0.0))
        for s in (5, 6)
    ]
    np.testing.assert_array_equal(greedy[0], greedy[1])
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
    as the metric computes it, and the LPIPS network is frozen weights: read from the
    backbone file, never in the train state."""
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
    terms = method.autoencode(model, batch["image"], fns.frozen)
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
    assert "lpips" not in new_state.params["model"] and "lpips" not in model
    frozen = jax.device_get(fns.frozen["lpips"])
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(vgg), strict=True):
        np.testing.assert_array_equal(a, b)
