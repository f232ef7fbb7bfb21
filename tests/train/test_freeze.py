"""Frozen parameter groups are an optimizer mask: zero updates, no optimizer state."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from t2i_jax.errors import ConfigError
from t2i_jax.optim import make_optimizer


def optim_config(**kw) -> ml_collections.ConfigDict:
    base = dict(
        lr=0.1, schedule="constant", warmup_steps=0, b1=0.9, b2=0.99, weight_decay=0.1,
        grad_clip=1.0, freeze="",
    )  # fmt: skip
    return ml_collections.ConfigDict({**base, **kw})


PARAMS = {
    "text_encoder": {"embed": jnp.ones((3, 2)), "norm": {"scale": jnp.ones(2)}},
    "unet": {"conv": {"kernel": jnp.ones((2, 2))}},
}


def step(tx, params):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), state


@pytest.mark.parametrize(
    "frozen, freeze",
    [(["text_encoder/.*"], ""), ([], "text_encoder/.*"), ([], "text_encoder/(embed|norm/.*)")],
)
def test_frozen_params_do_not_move(frozen, freeze):
    tx = make_optimizer(optim_config(freeze=freeze), 10, frozen=frozen)
    new, state = step(tx, PARAMS)
    for a, b in zip(
        jax.tree.leaves(new["text_encoder"]), jax.tree.leaves(PARAMS["text_encoder"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(new["unet"]["conv"]["kernel"], 1.0)
    # Adam moments exist for the trained leaves only.
    sizes = sum(x.size for x in jax.tree.leaves(state) if jnp.ndim(x) > 0)
    assert sizes == 2 * 4  # mu and nu of the 2x2 kernel


def test_unfrozen_equals_plain_adamw():
    plain, _ = step(make_optimizer(optim_config(), 10), PARAMS)
    expected, _ = step(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, 0.9, 0.99, weight_decay=0.1)),
        PARAMS,
    )
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "freeze, message", [("text_encoder/(", "bad regular expression"), ("vae/.*", "matches no")]
)
def test_bad_patterns_are_config_errors(freeze, message):
    with pytest.raises(ConfigError, match=message):
        tx = make_optimizer(optim_config(freeze=freeze), 10)
        tx.init(PARAMS)
