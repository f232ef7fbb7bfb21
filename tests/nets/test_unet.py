"""Tests for the diffusion U-Net and its layers (tiny widths, CPU)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import partitioning as part
from t2i_jax.layers import (
    CrossAttention2D,
    ResBlock,
    SelfAttention2D,
    attention_implementation,
    coordinate_channels,
    dot_product_attention,
    num_groups,
    sincos_2d,
    timestep_embedding,
)
from t2i_jax.nets.unet import UNet

B, L, D = 2, 6, 8
HW, MULTS = 16, (1, 2)
TINY = dict(base_channels=8, num_res_blocks=1, num_heads=2)
# unsafe_rbg keys compile far faster than threefry on CPU; the tests only need some key.
KEY = functools.partial(jax.random.key, impl="unsafe_rbg")


def _inputs(hw: int = HW) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return dict(
        x=jnp.asarray(rng.normal(size=(B, hw, hw, 3)), jnp.float32),
        t=jnp.array([3.0, 870.0]),
        text_seq=jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32),
        # Row 0 has 3 valid tokens, row 1 all L.
        text_mask=jnp.arange(L)[None, :] < jnp.array([[3], [L]]),
        text_pooled=jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
    )


def _variants() -> dict[str, jax.Array]:
    """The base inputs and four edits of them, stacked on the batch axis (rows independent).

    Blocks of B rows: base, text changed at valid tokens, pooled changed, t changed,
    text changed only at masked tokens.
    """
    base = _inputs()
    noise = jnp.asarray(np.random.default_rng(1).normal(size=(B, L, D)), jnp.float32)
    valid = base["text_mask"][..., None]
    edits = [
        {},
        {"text_seq": jnp.where(valid, noise, base["text_seq"])},
        {"text_pooled": base["text_pooled"] + 1.0},
        {"t": base["t"] + 100.0},
        {"text_seq": jnp.where(valid, base["text_seq"], 100.0 * noise)},
    ]
    return {k: jnp.concatenate([e.get(k, v) for e in edits]) for k, v in base.items()}


def _perturb(params, seed: int = 1, scale: float = 0.1):
    """Add noise to every parameter, so zero-initialised layers stop hiding the inputs."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: np.asarray(p) + scale * rng.normal(size=p.shape).astype(p.dtype), params
    )


def _compile(fn, *args):
    """jit-compile `fn` for `args` with XLA backend optimisation off: these tests spend their
    time compiling, not running."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


@functools.cache
def _setup():
    """One small model, its initial params and a jitted (output, grads) shared by the tests.

    Everything runs on the stacked `_variants()` batch, so the whole module compiles the
    model twice (init; forward + backward).
    """
    model = UNet(channel_mults=MULTS, **TINY)
    inputs = _variants()
    init = lambda key: nn.unbox(model.init(key, **inputs, train=False)["params"])
    params = _compile(init, KEY(0))(KEY(0))
    target = jnp.asarray(np.random.default_rng(5).normal(size=inputs["x"].shape), jnp.float32)

    def out_and_grads(p):
        def loss(p):
            out = model.apply({"params": p}, **inputs, train=False)
            return jnp.mean((out - target) ** 2), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(p)
        return out, grads

    return params, _compile(out_and_grads, params), inputs


@pytest.mark.parametrize("hw", [32, 16])
@pytest.mark.parametrize("mults", [(1, 2, 2), (1, 2)])
def test_output_shape(hw: int, mults: tuple[int, ...]) -> None:
    model = UNet(channel_mults=mults, **TINY)
    inputs = _inputs(hw)
    init = functools.partial(model.init, train=False)
    variables = jax.eval_shape(init, KEY(0), **inputs)
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, **inputs)
    assert out.shape == inputs["x"].shape
    assert out.dtype == jnp.float32


def test_zero_at_init_with_nonzero_gradients() -> None:
    params, out_and_grads, inputs = _setup()
    out, grads = out_and_grads(params)
    assert out.shape == inputs["x"].shape
    # The final conv is zero-initialised, so the untrained net predicts exactly zero...
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    # ...yet it learns: the loss has a gradient (through the final conv first).
    assert float(jnp.abs(grads["conv_out"]["kernel"]).max()) > 0


def test_every_parameter_gets_a_gradient() -> None:
    params, out_and_grads, _ = _setup()
    # Once no weight is zero, every parameter must get a gradient (no dead branches).
    _, grads = out_and_grads(_perturb(params))
    dead = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
        if not np.any(np.asarray(leaf) != 0)
    ]
    assert not dead, dead


def test_output_depends_on_text_and_t_but_not_padding() -> None:
    params, out_and_grads, _ = _setup()
    out, _ = out_and_grads(_perturb(params))
    base, text_valid, pooled, t, text_masked = np.asarray(out).reshape(5, B, -1)
    assert np.abs(base).max() > 0
    assert np.abs(text_valid - base).max() > 1e-3
    assert np.abs(pooled - base).max() > 1e-3
    assert np.abs(t - base).max() > 1e-3
    # Changing the text only where it is masked must leave the output unchanged.
    np.testing.assert_allclose(text_masked, base, rtol=0, atol=1e-6)


def test_without_text_sequence() -> None:
    model = UNet(channel_mults=MULTS, **TINY)
    inputs = {**_inputs(), "text_seq": None}
    variables = jax.eval_shape(functools.partial(model.init, train=False), KEY(0), **inputs)
    assert not any("cross_attn" in name for name in variables["params"])
    assert any("self_attn" in name for name in variables["params"])
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, **inputs)
    assert out.shape == inputs["x"].shape


def test_without_pooled_text() -> None:
    """`pooled_text=False`: no pooled projection, the pooled vector changes nothing, the
    token sequence still does; without a sequence too, the UNet refuses."""
    model = UNet(channel_mults=MULTS, pooled_text=False, **TINY)
    inputs = _inputs()
    params = model.init(KEY(0), **inputs, train=False)["params"]
    with_pooled = functools.partial(UNet(channel_mults=MULTS, **TINY).init, train=False)
    assert "pooled_proj" in jax.eval_shape(with_pooled, KEY(0), **inputs)["params"]
    assert "pooled_proj" not in params
    variables = {"params": _perturb(params)}
    apply = jax.jit(functools.partial(model.apply, train=False))
    base = np.asarray(apply(variables, **inputs))
    pooled = np.asarray(apply(variables, **{**inputs, "text_pooled": -inputs["text_pooled"]}))
    seq = np.asarray(apply(variables, **{**inputs, "text_seq": -inputs["text_seq"]}))
    assert np.abs(base).max() > 0
    np.testing.assert_array_equal(pooled, base)
    assert np.abs(seq - base).max() > 1e-3
    with pytest.raises(ValueError, match="no text"):
        model.init(KEY(0), **{**inputs, "text_seq": None}, train=False)


def test_resblock_dropout_only_in_training() -> None:
    block = ResBlock(8, dropout=0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 4)), jnp.float32)
    emb = jnp.ones((2, 16))
    params = _perturb(
        _compile(functools.partial(block.init, train=False), KEY(0), x, emb)(KEY(0), x, emb)[
            "params"
        ]
    )

    @jax.jit
    def fwd(rng):
        apply = functools.partial(block.apply, {"params": params}, x, emb, rngs={"dropout": rng})
        return apply(train=False), apply(train=True)

    (eval1, train1), (eval2, train2), (_, train1_again) = fwd(KEY(1)), fwd(KEY(2)), fwd(KEY(1))
    np.testing.assert_array_equal(eval1, eval2)
    np.testing.assert_array_equal(train1, train1_again)
    assert float(jnp.abs(train1 - train2).max()) > 0
    assert float(jnp.abs(train1 - eval1).max()) > 0


@pytest.mark.parametrize("dim", [16, 7])
def test_timestep_embedding_closed_form(dim: int) -> None:
    t = np.array([0.0, 1.0, 17.5, 999.0])
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        expected = np.concatenate([expected, np.zeros((len(t), 1))], axis=1)
    got = np.asarray(jax.jit(timestep_embedding, static_argnums=1)(jnp.asarray(t), dim))
    assert got.shape == (len(t), dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 sin/cos of args up to 999


def test_num_groups() -> None:
    assert [num_groups(c) for c in (8, 32, 64, 48, 96, 3, 1)] == [4, 16, 32, 24, 32, 1, 1]


def test_cross_attention_all_masked_row_adds_nothing() -> None:
    layer = CrossAttention2D(num_heads=2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    mask = jnp.array([[True, False, False, False, False], [False] * 5])
    params = _perturb(_compile(layer.init, KEY(2), x, ctx, mask)(KEY(2), x, ctx, mask)["params"])
    out = jax.jit(layer.apply)({"params": params}, x, ctx, mask)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(out[1], x[1])
    assert float(jnp.abs(out[0] - x[0]).max()) > 0


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_flax_attention(causal) -> None:
    """The explicit attention (CPU, float64) is Flax's bit for bit; jax.nn's XLA attention
    (accelerators) equals it up to float32 round-off: jax.nn contracts grouped heads,
    [B, T, K, G, H], so XLA sums in another order (measured 2.4e-7 at most here, on
    values of order 1). Padded keys and causal masks included."""
    rng = np.random.default_rng(0)
    b, t, heads, dim = 2, 5, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, dim)), jnp.float32) for _ in "qkv")
    mask = jnp.asarray(rng.random((b, 1, 1, t)) < 0.7).at[..., 0].set(True)
    if causal:
        mask = mask & jnp.tril(jnp.ones((t, t), bool))[None, None]
    mask = jnp.broadcast_to(mask, (b, heads, t, t))
    flax_ = jax.jit(lambda *a: nn.dot_product_attention(*a, mask=mask))(q, k, v)
    explicit = jax.jit(lambda *a: dot_product_attention(*a, mask, "explicit"))(q, k, v)
    xla = jax.jit(lambda *a: dot_product_attention(*a, mask, "xla"))(q, k, v)
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(flax_))
    np.testing.assert_allclose(np.asarray(xla), np.asarray(flax_), rtol=1e-5, atol=1e-6)
    assert attention_implementation(jnp.float32, dim) == "explicit"  # on this CPU


def test_sincos_2d_closed_form() -> None:
    """Row r*W + c of the embedding is [sin(r f), cos(r f), sin(c f), cos(c f)] with
    f_i = 10000^(-i / (dim / 4)); every position gets its own vector."""
    height, width, dim = 3, 5, 8
    emb = np.asarray(sincos_2d(height, width, dim))
    freqs = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))
    for r in range(height):
        for c in range(width):
            want = np.concatenate(
                [np.sin(r * freqs), np.cos(r * freqs), np.sin(c * freqs), np.cos(c * freqs)]
            )
            np.testing.assert_allclose(emb[r * width + c], want, rtol=1e-6, atol=1e-6)
    assert len(np.unique(emb.round(5), axis=0)) == height * width
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_coordinate_channels() -> None:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 3)), jnp.float32)
    out = np.asarray(coordinate_channels(x))
    assert out.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(out[..., :3], x)
    for b in range(2):  # channel 3 is the row, 4 the column, each from -1 to 1 (float32)
        rows, cols = np.repeat([[-1.0], [0.0], [1.0]], 4, 1), np.tile(np.linspace(-1, 1, 4), (3, 1))
        np.testing.assert_allclose(out[b, :, :, 3], rows, rtol=1e-6)
        np.testing.assert_allclose(out[b, :, :, 4], cols, rtol=1e-6)


@pytest.mark.parametrize("layer", ["self", "cross"])
def test_a_position_embedding_tells_attention_where_a_token_is(layer) -> None:
    """On an image whose pixels are all alike, attention gives every pixel the same output;
    with the position embedding added, the outputs differ from pixel to pixel."""
    x = jnp.broadcast_to(jnp.asarray(np.random.default_rng(0).normal(size=8), jnp.float32),
                         (1, 4, 4, 8))  # fmt: skip
    position = sincos_2d(4, 4, 8)
    if layer == "self":
        module, args = SelfAttention2D(num_heads=2), (x,)
    else:
        ctx = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 6)), jnp.float32)
        module, args = CrossAttention2D(num_heads=2), (x, ctx, jnp.ones((1, 5), bool))
    params = {"params": _perturb(module.init(KEY(0), *args)["params"])}
    blind = np.asarray(module.apply(params, *args)).reshape(16, 8)
    seeing = np.asarray(module.apply(params, *args, position)).reshape(16, 8)
    np.testing.assert_allclose(blind, np.broadcast_to(blind[0], blind.shape), atol=1e-5)
    assert np.abs(seeing - seeing[0]).max(axis=1)[1:].min() > 1e-3  # every pixel differs


def test_unet_position_options_params() -> None:
    """`learned` adds one sharded [H*W, C] table per attention layer and nothing else;
    `sincos` adds no parameters; `coord_channels` widens only conv_in's input, by 2."""
    inputs = _inputs()
    shapes = {}
    for name, fields in {
        "none": {},
        "sincos": {"position_embedding": "sincos"},
        "learned": {"position_embedding": "learned"},
        "coords": {"coord_channels": True},
    }.items():
        model = UNet(channel_mults=MULTS, **TINY, **fields)
        params = jax.eval_shape(lambda k, m=model: m.init(k, **inputs, train=False), KEY(0))
        shapes[name] = params["params"]
    flat = {k: jax.tree.leaves(v) for k, v in shapes.items()}
    assert jax.tree.structure(shapes["sincos"]) == jax.tree.structure(shapes["none"])
    added = {k: v for k, v in shapes["learned"].items() if k not in shapes["none"]}
    # Attention at 8x8 (down1, up1 x2, mid: self + cross) and cross at 16x16 (down0, up0 x2).
    assert sorted(added) == sorted(
        ["down0_0_position", "down1_0_position", "mid_position"]
        + [f"up{level}_{i}_position" for level in (0, 1) for i in (0, 1)]
    )
    for name, box in added.items():
        assert isinstance(box, nn.Partitioned) and box.names == part.EMBED_AXES
        hw = 16 if name.startswith(("down0", "up0")) else 8
        assert box.value.shape == (hw * hw, 8 if hw == 16 else 16)
    coords = shapes["coords"]["conv_in"]["kernel"].value.shape
    assert coords == (3, 3, 5, 8) and len(flat["coords"]) == len(flat["none"])
