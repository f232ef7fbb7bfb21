"""Frozen parameter groups are an optimizer mask: zero updates, no optimizer state, and the
trained parameters move exactly as AdamW (with clipping, weight decay, warm-up and cosine
decay) on the trained ones alone, written out here in numpy."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from t2i_jax.errors import ConfigError
from t2i_jax.optim import make_optimizer

LR, B1, B2, WEIGHT_DECAY, CLIP, WARMUP, TOTAL = 0.1, 0.9, 0.99, 0.1, 1.0, 2, 6


def optim_config(**kw) -> ml_collections.ConfigDict:
    base = dict(
        lr=LR, schedule="cosine", warmup_steps=WARMUP, b1=B1, b2=B2, weight_decay=WEIGHT_DECAY,
        grad_clip=CLIP, freeze="",
    )  # fmt: skip
    return ml_collections.ConfigDict({**base, **kw})


_rng = np.random.default_rng(0)
PARAMS = {
    "text_encoder": {
        "embed": _rng.normal(size=(3, 2)).astype(np.float32),
        "norm": {"scale": _rng.normal(size=(2,)).astype(np.float32)},
    },
    "unet": {"conv": {"kernel": _rng.normal(size=(2, 2)).astype(np.float32)}},
}


def gradients(params, steps: int = TOTAL):
    """Per step: large gradients on the text encoder (they would dominate a global norm
    taken over every leaf), and on the kernel gradients with norms above and below the
    clipping threshold."""
    rng = np.random.default_rng(1)
    scales = [3.0, 0.3, 5.0, 0.5, 2.0, 0.1]
    out = []
    for step in range(steps):
        g = jax.tree.map(lambda p: 100.0 * rng.normal(size=p.shape).astype(np.float32), params)
        kernel = rng.normal(size=(2, 2))
        g["unet"]["conv"]["kernel"] = (scales[step] * kernel / np.linalg.norm(kernel)).astype(
            np.float32
        )
        out.append(g)
    return out


def learning_rate(count: int) -> float:
    """Linear warm-up from 0 over WARMUP updates, then cosine to 0.1 lr at TOTAL."""
    if count < WARMUP:
        return LR * count / WARMUP
    decay = TOTAL - WARMUP
    progress = min(count - WARMUP, decay) / decay
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def reference_adamw(params: list[np.ndarray], grads: list[list[np.ndarray]]):
    """AdamW (Loshchilov & Hutter) with the global-norm clip over `params` only, float64."""
    p = [np.float64(x) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, g in enumerate(grads, start=1):
        g = [np.float64(x) for x in g]
        norm = math.sqrt(sum(float(np.sum(x**2)) for x in g))
        if norm > CLIP:
            g = [x * CLIP / norm for x in g]
        m = [B1 * a + (1 - B1) * x for a, x in zip(m, g, strict=True)]
        v = [B2 * a + (1 - B2) * x**2 for a, x in zip(v, g, strict=True)]
        lr = learning_rate(t - 1)
        p = [
            x - lr * ((a / (1 - B1**t)) / (np.sqrt(b / (1 - B2**t)) + 1e-8) + WEIGHT_DECAY * x)
            for x, a, b in zip(p, m, v, strict=True)
        ]
    return p


def run(tx, params, grads):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return jax.device_get(params), state


def leaves_under(tree, prefix: str):
    """(path, leaf) pairs whose path starts with `prefix`, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = ["/".join(str(k.key) for k in p) for p, _ in flat]
    return [
        (path, leaf) for path, (_, leaf) in zip(paths, flat, strict=True) if path.startswith(prefix)
    ]


@pytest.mark.parametrize(
    "frozen, freeze, frozen_prefixes",
    [
        (["text_encoder/.*"], "", ("text_encoder",)),
        ([], "text_encoder/.*", ("text_encoder",)),
        ([], "text_encoder/(embed|norm/.*)", ("text_encoder",)),
        ([], "text_encoder/embed", ("text_encoder/embed",)),
        ([], "", ()),
    ],
    ids=["method-pattern", "optim.freeze", "alternation", "one-leaf", "none"],
)
def test_frozen_params_stay_and_the_rest_follow_adamw_on_themselves(
    frozen, freeze, frozen_prefixes
):
    tx = make_optimizer(optim_config(freeze=freeze), TOTAL, frozen=frozen)
    params = jax.tree.map(jnp.asarray, PARAMS)
    grads = gradients(PARAMS)
    new, state = run(tx, params, grads)

    is_frozen = lambda path: any(path.startswith(p) for p in frozen_prefixes)
    before = dict(leaves_under(PARAMS, ""))
    after = dict(leaves_under(new, ""))
    trained = [path for path in before if not is_frozen(path)]
    for path in before:
        if is_frozen(path):  # bit for bit, after TOTAL updates with large gradients
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        else:
            assert np.max(np.abs(after[path] - before[path])) > 1e-3, path

    # The trained leaves move as AdamW on them alone: their own global norm is clipped,
    # and neither the frozen gradients nor the frozen values enter it.
    grads_by_path = [dict(leaves_under(g, "")) for g in grads]
    expected = reference_adamw(
        [before[p] for p in trained], [[g[p] for p in trained] for g in grads_by_path]
    )
    for path, want in zip(trained, expected, strict=True):
        np.testing.assert_allclose(after[path], want, rtol=2e-5, atol=1e-6, err_msg=path)

    # Adam's moments exist for the trained leaves only.
    sizes = sum(x.size for x in jax.tree.leaves(state) if jnp.ndim(x) > 0)
    assert sizes == 2 * sum(before[p].size for p in trained)


@pytest.mark.parametrize(
    "freeze, message", [("text_encoder/(", "bad regular expression"), ("vae/.*", "matches no")]
)
def test_bad_patterns_are_config_errors(freeze, message):
    with pytest.raises(ConfigError, match=message):
        tx = make_optimizer(optim_config(freeze=freeze), 10)
        tx.init(PARAMS)
