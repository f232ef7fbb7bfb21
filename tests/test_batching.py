"""Fixed-shape batches: padding values, trimming, ragged last batches, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.batching import map_in_batches, pad_to, padded_batches


def test_pad_to_edge_repeats_the_last_row():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    mask = np.array([True, False, True])
    (px, pm), n = pad_to([x, mask], 5, fill="edge")
    assert n == 3
    np.testing.assert_array_equal(px, [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(pm, [True, False, True, True, True])
    assert px.dtype == np.float32 and pm.dtype == bool


def test_pad_to_zeros_appends_zero_rows_of_the_dtype():
    x = np.full((2, 2, 3), 7, np.uint8)
    (px,), n = pad_to([x], 4, fill="zeros")
    assert n == 2 and px.shape == (4, 2, 3) and px.dtype == np.uint8
    np.testing.assert_array_equal(px[:2], x)
    np.testing.assert_array_equal(px[2:], 0)


def test_pad_to_full_batch_is_unchanged():
    x = np.arange(4).reshape(2, 2)
    (px,), n = pad_to([x], 2)
    assert n == 2 and px is x


@pytest.mark.parametrize(
    "arrays, size",
    [
        ([np.zeros((3, 2))], 2),  # longer than the batch
        ([np.zeros((0, 2))], 2),  # nothing to repeat
        ([np.zeros((2, 2)), np.zeros((3,))], 4),  # arrays of different lengths
        ([], 2),
    ],
)
def test_pad_to_refuses_bad_inputs(arrays, size):
    with pytest.raises(ValueError):
        pad_to(arrays, size)


def test_pad_to_refuses_an_unknown_fill():
    with pytest.raises(ValueError, match="fill"):
        pad_to([np.zeros((1, 2))], 2, fill="reflect")


def test_padded_batches_cover_all_rows_with_a_ragged_last_batch():
    x = np.arange(7)
    batches = list(padded_batches([x], 3, fill="zeros"))
    assert [(start, n) for start, _, n in batches] == [(0, 3), (3, 3), (6, 1)]
    assert all(b.shape == (3,) for _, (b,), _ in batches)
    np.testing.assert_array_equal(batches[-1][1][0], [6, 0, 0])
    np.testing.assert_array_equal(np.concatenate([b[:n] for _, (b,), n in batches]), x)


def test_padded_batches_refuse_a_bad_batch_size():
    with pytest.raises(ValueError, match="batch size"):
        list(padded_batches([np.zeros(3)], 0))


def test_map_in_batches_trims_pytree_outputs_and_compiles_once():
    traces = []

    @jax.jit
    def fn(x, y):
        traces.append(x.shape)  # runs once per compilation
        return {"sum": x + y, "pair": (x * 2, jnp.stack([x, y], axis=1))}

    x = np.arange(10, dtype=np.float32)
    y = np.arange(10, 20, dtype=np.float32)
    out = map_in_batches(fn, [x, y], 4, fill="edge")
    assert traces == [(4,)]  # three batches (4, 4, 2 padded to 4), one trace
    np.testing.assert_array_equal(out["sum"], x + y)
    np.testing.assert_array_equal(out["pair"][0], x * 2)
    np.testing.assert_array_equal(out["pair"][1], np.stack([x, y], axis=1))
    assert isinstance(out["sum"], np.ndarray)


@pytest.mark.parametrize("fill, padding", [("edge", 9.0), ("zeros", 0.0)])
def test_map_in_batches_feeds_the_fill_to_fn(fill, padding):
    seen = []

    def fn(x):
        seen.append(np.array(x))
        return x

    out = map_in_batches(fn, [np.arange(10, dtype=np.float32)], 4, fill=fill)
    np.testing.assert_array_equal(out, np.arange(10))
    np.testing.assert_array_equal(seen[-1], [8, 9, padding, padding])


def test_map_in_batches_refuses_empty_inputs():
    with pytest.raises(ValueError):
        map_in_batches(lambda x: x, [np.zeros((0, 2))], 4)
