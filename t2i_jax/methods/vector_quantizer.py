"""Vector quantisation for VQ-VAE (van den Oord et al. 2017) as pure functions.

The codebook is learned by exponential moving averages, not by gradients (the paper's
appendix; Sonnet's `VectorQuantizerEMA`). Its state is a pytree of three arrays:

  codebook      [K, D]  the code vectors e_k
  cluster_size  [K]     EMA of how many encoder outputs each code received per step
  embed_sum     [K, D]  EMA of the sum of those outputs

Per step, with n_k the batch's count for code k and s_k the sum of its encoder outputs:

  N_k <- d N_k + (1 - d) n_k,   m_k <- d m_k + (1 - d) s_k,
  e_k  = m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j

(N~ is N with Laplace smoothing, so an unused code never divides by zero). Dead codes
(N_k below `threshold`) are restarted on encoder outputs of the current batch, the usual
remedy for codebook collapse (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021).

The encoder gets the straight-through gradient z + stop_gradient(e - z) and the commitment
loss ||z - stop_gradient(e)||^2.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax import partitioning as part


def init_state(rng: jax.Array, num_codes: int, dim: int) -> dict[str, jax.Array]:
    """Codes drawn from N(0, 1/D) (unit-norm scale); each starts with a count of 1."""
    codebook = jax.random.normal(rng, (num_codes, dim), jnp.float32) / jnp.sqrt(dim)
    return {
        "codebook": codebook,
        "cluster_size": jnp.ones((num_codes,), jnp.float32),
        "embed_sum": codebook,
    }


def logical_axes(state: dict[str, jax.Array]) -> dict[str, nn.Partitioned]:
    """The codebook state boxed with its logical axes (codes as a table's rows), so a
    large codebook shards over `fsdp` like the networks' tables (sharding.py)."""
    return {
        name: nn.Partitioned(value, names=part.EMBED_AXES[: value.ndim])
        for name, value in state.items()
    }


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code (squared Euclidean distance) of each row of z [N, D]."""
    distances = (
        jnp.sum(z * z, axis=1, keepdims=True)
        # HIGHEST: a bf16-pass matmul (TPU's default) can misassign near ties.
        - 2.0 * jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
        + jnp.sum(codebook * codebook, axis=1)[None, :]
    )
    return jnp.argmin(distances, axis=1)


def straight_through(z: jax.Array, quantized: jax.Array) -> jax.Array:
    """The quantized values forward, the identity's gradient backward (to z)."""
    return z + jax.lax.stop_gradient(quantized - z)


def commitment_loss(z: jax.Array, quantized: jax.Array) -> jax.Array:
    """Per-example ||z - sg(e)||^2 averaged over the example's values: [B, ...] -> [B]."""
    err = jnp.square(z - jax.lax.stop_gradient(quantized))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def ema_update(
    state: dict[str, jax.Array], z: jax.Array, codes: jax.Array, *, decay: float, eps: float
) -> dict[str, jax.Array]:
    """One EMA step of the codebook from encoder outputs z [N, D] and their codes [N]."""
    z = jax.lax.stop_gradient(z)
    num_codes = state["codebook"].shape[0]
    one_hot = jax.nn.one_hot(codes, num_codes, dtype=z.dtype)
    counts = jnp.sum(one_hot, axis=0)
    sums = jnp.matmul(one_hot.T, z, precision=jax.lax.Precision.HIGHEST)
    cluster_size = decay * state["cluster_size"] + (1.0 - decay) * counts
    embed_sum = decay * state["embed_sum"] + (1.0 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
    return {
        "codebook": embed_sum / smoothed[:, None],
        "cluster_size": cluster_size,
        "embed_sum": embed_sum,
    }


def restart_dead_codes(
    state: dict[str, jax.Array], z: jax.Array, rng: jax.Array, *, threshold: float
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Codes whose EMA count is below `threshold` move to random rows of z [N, D].

    A restarted code gets the count `threshold` and a matching sum, so the next EMA step
    keeps it where it was put; it stays alive if it then wins about `threshold` encoder
    outputs per step. Returns the new state and the number of codes restarted.
    """
    z = jax.lax.stop_gradient(z)
    dead = state["cluster_size"] < threshold
    picks = z[jax.random.randint(rng, (dead.shape[0],), 0, z.shape[0])]
    codebook = jnp.where(dead[:, None], picks, state["codebook"])
    cluster_size = jnp.where(dead, threshold, state["cluster_size"])
    embed_sum = jnp.where(dead[:, None], picks * threshold, state["embed_sum"])
    new = {"codebook": codebook, "cluster_size": cluster_size, "embed_sum": embed_sum}
    return new, jnp.sum(dead)


def usage(codes: jax.Array, num_codes: int) -> dict[str, jax.Array]:
    """Codebook usage of a batch: perplexity exp(H(p)) of the code frequencies p (K when
    uniform, 1 when collapsed) and the fraction of codes used at least once."""
    counts = jnp.sum(jax.nn.one_hot(codes.reshape(-1), num_codes, dtype=jnp.float32), axis=0)
    p = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"perplexity": jnp.exp(entropy), "codes_used": jnp.mean(counts > 0)}
