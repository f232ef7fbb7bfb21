"""Spectral normalisation (Miyato et al. 2018): a weight divided by its largest singular
value, estimated by power iteration.

`SNDense` and `SNConv` are `nn.Dense` and `nn.Conv` (same parameter names, shapes,
initialisers and logical axes) whose kernel is used as W / sigma(W). The kernel is read as
the matrix W [out, in] (PyTorch's `weight.view(out, -1)`); its power-iteration vector
u [out] lives in the `spectral` collection at the kernel's own path (".../kernel" in
`params`, ".../u" in `spectral`).

A layer never changes u: in a forward pass it reads u, takes v = W^T u / |W^T u| and
sigma = u^T W v = |W^T u|, with u and v held constant (the gradient of sigma is u v^T, as
Miyato et al.). `power_iterate` is the one place u moves, a pure function of the params
and the collection, so a trainer updates it once per training step however many forward
passes the step makes, checkpoints it with the state, and sampling leaves it frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from t2i_jax import partitioning as part

SPECTRAL = "spectral"  # the collection holding every u
EPS = 1e-12


def _normalise(x: jax.Array) -> jax.Array:
    return x / (jnp.linalg.norm(x) + EPS)


def kernel_matrix(kernel: jax.Array) -> jax.Array:
    """W [out, in]: a Dense [in, out] or Conv [kh, kw, in, out] kernel as a matrix."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def sigma(kernel: jax.Array, u: jax.Array) -> jax.Array:
    """u^T W v with v = W^T u / |W^T u|, u and v constant (float32)."""
    w = kernel_matrix(kernel.astype(jnp.float32))
    u = jax.lax.stop_gradient(u.astype(jnp.float32))
    v = jax.lax.stop_gradient(_normalise(w.T @ u))
    return u @ (w @ v)


def normalised(kernel: jax.Array, u: jax.Array) -> jax.Array:
    """The kernel a layer computes with: kernel / sigma, in the kernel's dtype."""
    return (kernel.astype(jnp.float32) / sigma(kernel, u)).astype(kernel.dtype)


def power_iteration(kernel: jax.Array, u: jax.Array, steps: int = 1) -> jax.Array:
    """u after `steps` rounds of v = W^T u / |W^T u|, u = W v / |W v| (float32)."""
    w = jax.lax.stop_gradient(kernel_matrix(kernel.astype(jnp.float32)))
    u = u.astype(jnp.float32)
    for _ in range(steps):
        u = _normalise(w @ _normalise(w.T @ u))
    return u


def power_iterate(params: dict, spectral: dict, steps: int = 1) -> dict:
    """Every u of `spectral` advanced `steps` rounds against its kernel in `params` (the
    same module path): the once-per-step update. Dtypes are kept."""
    kernels = traverse_util.flatten_dict(nn.unbox(params))
    flat = traverse_util.flatten_dict(spectral)
    updated = {}
    for path, u in flat.items():
        kernel = kernels.get((*path[:-1], "kernel"))
        if kernel is None:
            raise KeyError(f"spectral vector {'/'.join(path)} has no kernel beside it")
        updated[path] = power_iteration(kernel, u, steps).astype(u.dtype)
    return traverse_util.unflatten_dict(updated)


def _spectral_vector(module: nn.Module, out_features: int) -> nn.Variable:
    """The layer's u: a random unit vector, drawn (from the `params` stream) only at init."""
    init = lambda: _normalise(jax.random.normal(module.make_rng("params"), (out_features,)))
    return module.variable(SPECTRAL, "u", init)


class SNDense(nn.Module):
    """`nn.Dense` with a spectrally normalised kernel."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    axes: Sequence[str | None] = part.DENSE_AXES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", part.annotated(self.kernel_init, self.axes), (x.shape[-1], self.features)
        )
        u = _spectral_vector(self, self.features)
        w = normalised(kernel, u.value).astype(self.dtype)
        y = x.astype(self.dtype) @ w
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class SNConv(nn.Module):
    """`nn.Conv` (stride 1, SAME padding) with a spectrally normalised kernel."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", part.annotated(self.kernel_init, part.CONV_AXES), shape)
        u = _spectral_vector(self, self.features)
        w = normalised(kernel, u.value).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y
