"""GAN objectives and regularisers as pure functions of discriminator logits.

D(x) = sigmoid(l) for a logit l, and every log-probability is written with softplus, which
is exact and finite for any logit (|l| = 100 included):

  log D(x)       = log sigmoid(l)     = -softplus(-l)
  log(1 - D(x))  = log sigmoid(-l)    = -softplus(l)

Objectives (Goodfellow et al. 2014; Lim & Ye 2017 for hinge), each a (D loss, G loss) pair
that both players *minimise*:

  minimax          D: -log D(x) - log(1 - D(G(z)))  = softplus(-l_real) + softplus(l_fake)
                   G:  log(1 - D(G(z)))             = -softplus(l_fake)
  non_saturating   D: as minimax;  G: -log D(G(z))  = softplus(-l_fake)
  hinge            D: relu(1 - l_real) + relu(1 + l_fake);  G: -l_fake

Every function returns per-example values [B]; the method weighs and reduces them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

OBJECTIVES = ("minimax", "non_saturating", "hinge")


def d_real_loss(objective: str, logits: jax.Array) -> jax.Array:
    """The discriminator's loss on examples it should call real."""
    if objective in ("minimax", "non_saturating"):
        return jax.nn.softplus(-logits)
    if objective == "hinge":
        return jax.nn.relu(1.0 - logits)
    raise ValueError(f"unknown GAN objective '{objective}'; choose from {OBJECTIVES}")


def d_fake_loss(objective: str, logits: jax.Array) -> jax.Array:
    """The discriminator's loss on examples it should call fake."""
    if objective in ("minimax", "non_saturating"):
        return jax.nn.softplus(logits)
    if objective == "hinge":
        return jax.nn.relu(1.0 + logits)
    raise ValueError(f"unknown GAN objective '{objective}'; choose from {OBJECTIVES}")


def g_loss(objective: str, fake_logits: jax.Array) -> jax.Array:
    """The generator's loss on D's logits of its samples."""
    if objective == "minimax":
        return -jax.nn.softplus(fake_logits)  # log(1 - D(G(z)))
    if objective == "non_saturating":
        return jax.nn.softplus(-fake_logits)  # -log D(G(z))
    if objective == "hinge":
        return -fake_logits
    raise ValueError(f"unknown GAN objective '{objective}'; choose from {OBJECTIVES}")


def orthogonal_regularisation(params) -> jax.Array:
    """BigGAN's orthogonal regularisation, sum over kernels of ||W W^T * (1 - I)||_F^2:
    the squared off-diagonal entries of the Gram matrix of each kernel's filters, W the
    kernel as [out, in] (`kernel` leaves of two or more dimensions: Dense [in, out], Conv
    [kh, kw, in, out]). Unlike full orthogonality it leaves the filters' norms free.
    The caller multiplies by beta (BigGAN: 1e-4)."""
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = getattr(path[-1], "key", None)
        if name != "kernel" or leaf.ndim < 2:
            continue
        w = leaf.astype(jnp.float32).reshape(-1, leaf.shape[-1]).T
        gram = w @ w.T
        total = total + jnp.sum(jnp.square(gram * (1.0 - jnp.eye(gram.shape[0]))))
    return total


def squared_grad_norm(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """||d fn(x)_i / d x_i||^2 per example [B], for fn mapping [B, ...] -> [B]."""
    grads = jax.grad(lambda v: jnp.sum(fn(v)))(x)
    return jnp.sum(jnp.square(grads).reshape(x.shape[0], -1), axis=1)


def r1_penalty(fn: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """R1 (Mescheder et al. 2018): 0.5 * ||grad_x D(x)||^2 on real images, per example.

    The caller multiplies by gamma (and, when lazy, by the interval k).
    """
    return 0.5 * squared_grad_norm(fn, real)


def matching_aware_gp(
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    real: jax.Array,
    text: jax.Array,
    *,
    power: float = 6.0,
) -> jax.Array:
    """DF-GAN's MA-GP: ||(grad_x D, grad_text D)||^power on real images with their own text.

    Per example [B]; DF-GAN uses weight k = 2 and power p = 6 on the sentence vector.
    """

    def total(inputs):
        return jnp.sum(fn(*inputs))

    gx, gt = jax.grad(total)((real, text))
    squared = jnp.sum(jnp.square(gx).reshape(real.shape[0], -1), axis=1) + jnp.sum(
        jnp.square(gt).reshape(text.shape[0], -1), axis=1
    )
    # sqrt(0) has an infinite derivative; the epsilon keeps the penalty's gradient finite.
    return jnp.power(squared + 1e-12, power / 2.0)
