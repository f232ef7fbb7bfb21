"""The scale-out options of a train step: mixed precision (`train.compute_dtype`,
`train.param_dtype`), gradient accumulation (`train.grad_accum_steps`) and rematerialisation
(`train.remat`), each against the plain float32 step it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import build_method, real_batch, train_steps

from t2i_jax.methods import microbatches as mb
from t2i_jax.methods.base import TrainState, gradient_update, next_state
from t2i_jax.train import throughput

DIFFUSION = "experiments/diffusion_shapes.py"
GAN = "experiments/gan_shapes.py"


# The test variants, narrower still: these tests compare programs, not what they learn, and
# each compiles its own train step at batch 32.
TINY = {
    DIFFUSION: {"model.base_channels": 8, "model.num_heads": 1, "train.batch_size": 32},
    GAN: {"gan.network": "dfgan", "gan.matching_aware": True, "train.batch_size": 32},
}


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    """(method, train functions, batch) per (experiment, extra overrides), built once."""
    cache, configs = {}, {}

    def get(experiment, **overrides):
        key = (experiment, tuple(sorted(overrides.items())))
        if key not in cache:
            workdir = tmp_path_factory.mktemp("run")
            config, builder, method, fns = build_method(
                experiment, data_dir, workdir, **TINY[experiment], **overrides
            )
            cache[key] = (method, fns, real_batch(config, builder, method))
            configs[key] = config
        return cache[key]

    get.config = lambda experiment, **overrides: configs[
        (experiment, tuple(sorted(overrides.items())))
    ]
    return get


def run_steps(fns, batch, steps: int):
    state, logs = train_steps(fns, batch, steps)
    return jax.device_get(state), logs


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, err_msg=str(path)
        )


# -- gradient accumulation ------------------------------------------------------------------


def test_microbatch_rows_are_the_whole_batch_draws():
    key = jax.random.key(3)
    whole = jax.random.normal(key, (12, 5))
    parts = [mb.Rows(i, 4).normal(key, (3, 5)) for i in range(4)]
    # Microbatch i holds rows i, i + 4, i + 8: the split of the batch and of every draw.
    split = mb.split({"x": whole}, 4)["x"]
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(part, whole[i::4])
        np.testing.assert_array_equal(split[i], whole[i::4])
    np.testing.assert_array_equal(mb.merge(split), whole)
    np.testing.assert_array_equal(mb.merge(jnp.arange(4.0)), 1.5)  # scalars: their mean
    assert mb.WHOLE.key(key) is key and mb.Rows(1, 4).key(key) is not key


@pytest.mark.parametrize("experiment", [DIFFUSION, GAN], ids=["diffusion", "gan"])
def test_accumulating_4_microbatches_of_8_equals_one_batch_of_32(experiment, built):
    # DF-GAN (TINY): its networks draw nothing inside. (StyleGAN2's noise inputs and
    # minibatch stddev are per microbatch: the same distribution, not the same numbers.)
    _, one, batch = built(experiment)
    _, four, _ = built(experiment, **{"train.grad_accum_steps": 4})
    state_one, logs_one = run_steps(one, batch, steps=1)
    state_four, logs_four = run_steps(four, batch, steps=1)
    # The same sums in another order (4 partial means, then their mean): float32 round-off.
    # One step compares the loss, the gradients (Adam's moments after one step are fixed
    # multiples of the gradient and of its square) and the update. Adam divides by
    # sqrt(v), so where a gradient is near zero its relative round-off reaches the update
    # at up to lr (GAN 2e-4; diffusion's lr is 0 at step 0, the warm-up's start). Measured
    # (2 steps, 2026-11-27): losses within 2e-7 relative, parameters within 4e-7
    # (diffusion) and 2.9e-6 (GAN, 1 of 8192 entries) absolute.
    for a, b in zip(logs_one, logs_four, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert_trees_close(state_one.params, state_four.params, atol=1e-5)
    assert_trees_close(state_one.opt_state, state_four.opt_state, atol=1e-5)
    # ... and not because there was nothing to compare: the gradients are not zero.
    moments = [np.max(np.abs(x)) for x in jax.tree.leaves(state_one.opt_state) if x.ndim]
    assert max(moments) > 1e-6


def test_an_accumulated_step_counts_the_flops_of_the_whole_batch(built):
    from t2i_jax.train.loop import train_step_flops

    one_method, one, _ = built(DIFFUSION)
    method, four, _ = built(DIFFUSION, **{"train.grad_accum_steps": 4})
    config = built.config(DIFFUSION, **{"train.grad_accum_steps": 4})
    flops = train_step_flops(method, four, config)
    assert flops == train_step_flops(one_method, one, built.config(DIFFUSION))
    # XLA's own count of the scan step sees the loop body (one microbatch) once.
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=four.batch_sharding),
        built(DIFFUSION)[2],
    )
    lowered = four.step_fn.lower(four.abstract_state, batch, jax.random.key(0), four.frozen)
    assert throughput.step_flops(lowered) < 0.5 * flops


def test_grad_accum_steps_must_divide_the_batch(built):
    from t2i_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="grad_accum_steps=3 does not divide"):
        built(DIFFUSION, **{"train.grad_accum_steps": 3})


# -- mixed precision --------------------------------------------------------------------------


def test_bfloat16_compute_trains_close_to_float32_with_float32_state(built):
    _, f32, batch = built(DIFFUSION)
    method, bf16, _ = built(DIFFUSION, **{"train.compute_dtype": "bfloat16"})
    assert method.unet.dtype == jnp.bfloat16 and method.text_setup.encoder.dtype == jnp.bfloat16
    state32, logs32 = run_steps(f32, batch, steps=3)
    state16, logs16 = run_steps(bf16, batch, steps=3)
    # Stored parameters, optimizer moments and EMA stay float32.
    for leaf in jax.tree.leaves((state16.params, state16.ema_params, state16.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per operation); over
    # the UNet's ~30 layers the loss moves by a few tenths of a percent. Measured: 0.3% to
    # 0.5% relative on the first losses; 2% is the bound.
    losses32 = [log["loss"] for log in logs32]
    losses16 = [log["loss"] for log in logs16]
    print("bf16 vs f32 losses", losses16, losses32, np.abs(np.array(losses16) / losses32 - 1))
    assert np.all(np.isfinite(losses16))
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2)
    assert losses16[-1] != losses32[-1]  # it did compute in bfloat16

    # The convolutions take bfloat16 operands (the lowered step's StableHLO text).
    hlo = bf16.step_fn.lower(
        bf16.abstract_state, jax.device_put(batch, bf16.batch_sharding), jax.random.key(1), {}
    ).as_text()
    convs = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
    assert convs and all("bf16" in line for line in convs)


def test_bfloat16_params_keep_a_float32_optimizer_and_ema():
    """The skeleton every player shares, on a linear model: bfloat16 parameters, float32
    Adam moments, EMA and update (computed on the float32 copy, then rounded once)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    optimizer = optax.adam(0.1)
    state = TrainState.create({"model": params}, {"model": optimizer}, param_dtype=jnp.bfloat16)
    x = jnp.arange(4.0).reshape(2, 2)

    def loss_fn(p, examples, rows):
        del rows
        return jnp.mean(jnp.square(examples @ p["w"].astype(jnp.float32))), None

    update = gradient_update(loss_fn, state.params["model"], state.opt_state["model"], optimizer, x)
    new = next_state(state, {"model": update.params}, {"model": update.opt_state}, 0.9)
    assert new.params["model"]["w"].dtype == jnp.bfloat16
    assert new.ema_params["model"]["w"].dtype == jnp.float32
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(new.opt_state) if m.ndim)
    # Adam's first step moves every weight by lr against its gradient's sign, from the
    # bfloat16 weight in float32, rounded to bfloat16 once.
    w16 = state.params["model"]["w"].astype(jnp.float32)
    grad = jax.grad(lambda w: jnp.mean(jnp.square(x @ w)))(w16)
    expected = (w16 - 0.1 * jnp.sign(grad)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(new.params["model"]["w"], expected)


def test_an_unknown_dtype_is_a_config_error(built):
    from t2i_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compute_dtype='float16': choose"):
        built(DIFFUSION, **{"train.compute_dtype": "float16"})
