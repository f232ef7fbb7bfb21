"""The GAN's training step against independent computations: n_critic discriminator updates
per step (and D's schedule over all of them), lazy R1 (value and gradient) against float64
references and finite differences, MA-GP against a closed form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import build_method, real_batch

from t2i_jax.methods import gan_losses as losses

GAN_EXPERIMENT = "experiments/gan_shapes.py"


def fresh_state(fns, step: int):
    """The init state (key 0) at `step`: a new copy each call, since the step donates it."""
    state = fns.init(jax.random.key(0))
    return state.replace(step=jnp.asarray(step, jnp.int32))


def counts(opt_state) -> list[int]:
    """Every step counter in an optax state (Adam's, the schedule's)."""
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return [int(v) for p, v in leaves if getattr(p[-1], "name", None) == "count"]


def adam_state(opt_state) -> optax.ScaleByAdamState:
    (state,) = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    return state


def moved(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return any(not np.array_equal(x, y) for x, y in pairs)


def shift(params, direction, s: float):
    return jax.tree.map(lambda p, d: p + s * d, params, direction)


def lr_sequence(tx: optax.GradientTransformation, params, n: int) -> np.ndarray:
    """The learning rate of each of `tx`'s first n updates, read off the update of a zero
    parameter (under "net") with gradient 1: Adam's normalised step with b1 = 0 is then
    1 / (1 + eps) at every step."""
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    lrs = []
    for _ in range(n):
        updates, state = update(grads, state, params)
        lrs.append(-float(jax.tree.leaves(updates["net"])[0].reshape(-1)[0]) * (1 + 1e-8))
    return np.asarray(lrs)


def cosine(lr: float, count: np.ndarray, total: int, alpha: float = 0.1) -> np.ndarray:
    """optim.schedule=cosine without warm-up: lr (alpha + (1 - alpha)(1 + cos(pi c / T)) / 2)."""
    c = np.minimum(count, total)
    return lr * (alpha + (1 - alpha) * 0.5 * (1 + np.cos(np.pi * c / total)))


def test_n_critic_updates_d_n_times_per_step_over_a_schedule_of_all_its_updates(data_dir, tmp_path):
    n_critic, k = 3, 2
    config, builder, method, fns = build_method(
        GAN_EXPERIMENT,
        data_dir,
        tmp_path,
        **{
            "gan.n_critic": n_critic,
            "gan.ma_gp_weight": 0.0,  # a quicker compile; the penalties are not tested here
            "optim.schedule": "cosine",
            "optim_d.schedule": "cosine",
        },
    )
    for optim in (config.optim, config.optim_d):  # what lr_sequence and cosine assume
        assert optim.b1 == 0.0 and optim.warmup_steps == 0 and optim.weight_decay == 0.0
    state = fns.init(jax.random.key(0))
    batch = real_batch(config, builder, method)
    before = jax.device_get(state.params)
    for step in range(k):
        state, metrics = fns.train_step(state, batch, jax.random.key(step))
        assert all(np.isfinite(float(v)) for v in metrics.values())
    assert int(state.step) == k
    d_counts, g_counts = (
        counts(state.opt_state["discriminator"]),
        counts(state.opt_state["generator"]),
    )
    assert d_counts and set(d_counts) == {n_critic * k}  # Adam's count and the schedule's
    assert g_counts and set(g_counts) == {k}
    assert moved(before["discriminator"], jax.device_get(state.params["discriminator"]))
    assert moved(before["generator"]["net"], jax.device_get(state.params["generator"]["net"]))

    # D's cosine decays over train.steps * n_critic updates, G's over train.steps.
    steps = config.train.steps
    d_total = steps * n_critic
    d_params = jax.tree.map(jnp.zeros_like, before["discriminator"])
    got = lr_sequence(method.d_optimizer, d_params, d_total + 2)
    want = cosine(config.optim_d.lr, np.arange(d_total + 2), d_total)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[steps] > 2 * config.optim_d.lr * 0.1  # not yet at its floor after `steps`
    g_params = jax.tree.map(jnp.zeros_like, before["generator"])
    got_g = lr_sequence(method.g_optimizer, g_params, steps + 1)
    want_g = cosine(config.optim.lr, np.arange(steps + 1), steps)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5)


def build_r1(data_dir, tmp_path, gamma: float, every: int):
    return build_method(
        GAN_EXPERIMENT,
        data_dir,
        tmp_path,
        **{"gan.r1_gamma": gamma, "gan.r1_every": every, "gan.ma_gp_weight": 0.0},
    )


def float64_r1(method, d_net, images, text):
    """0.5 * mean_b ||grad_x D(x_b, t_b)||^2 and the per-example gradients, with a float64
    copy of the discriminator (x64 must be on)."""
    disc = method.discriminator.clone(dtype=jnp.float64)
    x, t = (jnp.asarray(a, jnp.float64) for a in (images, text))

    def d_of(params, v):
        return disc.apply({"params": params}, v, t)

    def grads(params):  # D is per example, so the gradient of the sum splits by example
        return jax.grad(lambda v: jnp.sum(d_of(params, v)))(x)

    def r1(params):
        g = grads(params)
        return 0.5 * jnp.mean(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1))

    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), d_net)
    return params, d_of, jax.jit(grads), jax.jit(r1), x


def test_lazy_r1_is_logged_on_its_steps_and_its_gradient_is_gamma_k_r1(data_dir, tmp_path):
    gamma, every = 5.0, 2
    config, builder, method, fns = build_r1(data_dir, tmp_path, gamma, every)
    assert config.optim_d.b1 == 0.0 and config.optim_d.grad_clip >= 1e6  # mu is the gradient
    batch = real_batch(config, builder, method)
    init = jax.device_get(fresh_state(fns, 0))
    key = jax.random.key(7)
    runs = {}
    for step in range(4):
        new, metrics = fns.train_step(fresh_state(fns, step), batch, key)
        mu = adam_state(new.opt_state["discriminator"]).mu
        runs[step] = ({k: float(v) for k, v in metrics.items()}, jax.device_get(mu))

    # Off the lazy steps r1 is exactly 0 and the loss is the adversarial one alone.
    assert runs[1][0]["r1"] == 0.0 and runs[3][0]["r1"] == 0.0
    assert runs[0][0]["r1"] == runs[2][0]["r1"] > 0
    for step in range(4):
        assert runs[step][0]["d_loss"] == runs[0][0]["d_loss"]  # the adversarial term

    g = init.params["generator"]
    text = method.conditioner.features(method.conditioner.params(g, None), batch).pooled
    with jax.enable_x64(True):
        params, d_of, grads, r1, x = float64_r1(
            method, init.params["discriminator"]["net"], batch["image"], text
        )
        g_x = grads(params)
        # The reference gradient against central differences: along a random direction per
        # example, and along g_x itself (whose derivative is ||g_x||^2, R1's sum).
        h = 1e-5
        d = jax.jit(lambda v: d_of(params, v))
        u = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
        for direction in (u, g_x):
            fd = (d(x + h * direction) - d(x - h * direction)) / (2 * h)
            exact = jnp.sum((g_x * direction).reshape(x.shape[0], -1), axis=1)
            np.testing.assert_allclose(np.asarray(fd), np.asarray(exact), rtol=1e-6)
        norms_fd = (d(x + h * g_x) - d(x - h * g_x)) / (2 * h)  # ||grad_x D(x_b)||^2
        r1_fd = 0.5 * float(jnp.mean(norms_fd))
        # The logged r1 (float32) is 0.5 E||grad_x D(x)||^2 on the real batch.
        np.testing.assert_allclose(runs[0][0]["r1"], r1_fd, rtol=1e-4)

        # D's gradient with R1 minus without it is gamma * every * grad_theta(r1).
        diff = jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), runs[0][1], runs[1][1])
        assert jax.tree.structure(diff) == jax.tree.structure({"net": params})
        expected = jax.grad(r1)(params)
        flat_diff = np.concatenate([np.ravel(a) for a in jax.tree.leaves(diff["net"])])
        flat_expected = (
            gamma * every * np.concatenate([np.ravel(a) for a in jax.tree.leaves(expected)])
        )
        scale = np.max(np.abs(flat_expected))
        assert scale > 0
        np.testing.assert_allclose(flat_diff, flat_expected, rtol=1e-3, atol=3e-4 * scale)
        # ...and against central differences of r1 in the parameters, along random
        # directions (no autodiff of the penalty's own gradient).
        leaves, treedef = jax.tree.flatten(params)
        for seed in range(3):
            keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
            v = jax.tree.unflatten(
                treedef,
                [
                    jax.random.normal(k, leaf.shape, jnp.float64)
                    for k, leaf in zip(keys, leaves, strict=True)
                ],
            )
            eps = 1e-6
            fd = (float(r1(shift(params, v, eps))) - float(r1(shift(params, v, -eps)))) / (2 * eps)
            along = sum(
                float(np.sum(a * np.asarray(b)))
                for a, b in zip(jax.tree.leaves(diff["net"]), jax.tree.leaves(v), strict=True)
            )
            np.testing.assert_allclose(along, gamma * every * fd, rtol=2e-3)


def hand_written_d(params, x, t):
    """D(x, t) = <w, x> + 0.5 <a, x^2> + (<v, t>)^2 + c sum(x) <u, t>, per example."""
    w, a, v, u, c = params
    flat = x.reshape(x.shape[0], -1)
    return flat @ w + 0.5 * (flat**2) @ a + (t @ v) ** 2 + c * jnp.sum(flat, axis=1) * (t @ u)


def hand_written_gradients(params, x, t):
    """The closed-form (grad_x D, grad_t D) of `hand_written_d`, in numpy float64."""
    w, a, v, u, c = (np.asarray(p, np.float64) for p in params)
    flat, t = np.asarray(x, np.float64).reshape(x.shape[0], -1), np.asarray(t, np.float64)
    gx = w[None] + a[None] * flat + c * (t @ u)[:, None]
    gt = 2 * (t @ v)[:, None] * v[None] + c * flat.sum(1)[:, None] * u[None]
    return gx, gt


@pytest.mark.parametrize("power", [2.0, 6.0])
def test_matching_aware_gp_equals_a_closed_form(power):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 2, 3))
    t = rng.normal(size=(3, 5))
    params = (
        rng.normal(size=12),
        rng.uniform(0.5, 1.5, size=12),
        rng.normal(size=5),
        rng.normal(size=5),
        0.7,
    )
    gx, gt = hand_written_gradients(params, x, t)
    squared = np.sum(gx**2, axis=1) + np.sum(gt**2, axis=1)
    expected = squared ** (power / 2)
    with jax.enable_x64(True):
        p64 = tuple(jnp.asarray(p, jnp.float64) for p in params)
        fn = lambda images, text: hand_written_d(p64, images, text)
        got = losses.matching_aware_gp(
            fn, jnp.asarray(x, jnp.float64), jnp.asarray(t, jnp.float64), power=power
        )
        assert got.shape == (3,)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-9)
    # float32, as training runs it
    p32 = tuple(jnp.asarray(p, jnp.float32) for p in params)
    got32 = losses.matching_aware_gp(
        lambda images, text: hand_written_d(p32, images, text),
        jnp.asarray(x, jnp.float32),
        jnp.asarray(t, jnp.float32),
        power=power,
    )
    np.testing.assert_allclose(np.asarray(got32), expected, rtol=1e-4)
    # Differentiable in D's parameters (the penalty trains D): finite everywhere.
    grad = jax.grad(
        lambda c: jnp.sum(
            losses.matching_aware_gp(
                lambda i, s: hand_written_d((*p32[:4], c), i, s),
                jnp.asarray(x, jnp.float32),
                jnp.asarray(t, jnp.float32),
                power=power,
            )
        )
    )(jnp.float32(0.7))
    assert np.isfinite(float(grad))
