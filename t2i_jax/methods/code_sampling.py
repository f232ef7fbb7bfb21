"""Sampling a code sequence from the autoregressive prior: temperature, top-k, top-p and
classifier-free guidance, as one compiled `lax.scan` over positions.

`sample_codes` decodes with the prior's key/value cache (one token per step);
`sample_codes_uncached` reruns the whole prefix every step. Both draw position i's code
with the key fold_in(rng, i) from the same filtered logits, so with the same seed they give
the same codes; the uncached one exists to test the cache.

Guidance runs the conditional and the unconditional (empty caption) rows as one batch of
2B and mixes their logits, l = l_uncond + w (l_cond - l_uncond) (Ho & Salimans 2022, as
used for autoregressive priors by e.g. Parti and Make-A-Scene); both rows then take the
same sampled code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from t2i_jax.errors import UserError
from t2i_jax.methods import guidance
from t2i_jax.nets.code_prior import CodePrior, init_cache


class SamplingOptions(NamedTuple):
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely codes (0: all)
    top_p: float = 1.0  # keep the smallest set of codes with this much mass (1: all)
    guidance: float = 1.0  # classifier-free guidance scale w (1: conditional only)


def filter_logits(logits: jax.Array, *, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k and the top-p nucleus to -inf ([..., K])."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the codes ranked above
        keep = (before < top_p).at[..., 0].set(True)  # the most likely code always stays
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def check_options(options: SamplingOptions, num_codes: int) -> None:
    """One-line errors for options that would sample nonsense (or fail while tracing)."""
    if options.temperature < 0:
        raise UserError(f"temperature must be >= 0, got {options.temperature}")
    if not 0 <= options.top_k <= num_codes:
        raise UserError(f"top_k must be in [0, {num_codes}] (0: off), got {options.top_k}")
    if not 0 < options.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1: off), got {options.top_p}")


def _draw(key: jax.Array, logits: jax.Array, options: SamplingOptions) -> jax.Array:
    if options.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / options.temperature, top_k=options.top_k, top_p=options.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_codes(
    prior: CodePrior,
    params,
    text_seq: jax.Array,
    text_mask: jax.Array,
    null_seq: jax.Array,
    null_mask: jax.Array,
    rng: jax.Array,
    options: SamplingOptions,
) -> jax.Array:
    """codes int32 [B, seq_len], decoded one token per step with the key/value cache."""
    batch = text_seq.shape[0]
    ctx_seq, ctx_mask = guidance.doubled(
        (text_seq, text_mask), (null_seq, null_mask), options.guidance
    )
    rows = ctx_seq.shape[0]
    cache = init_cache(prior, rows, ctx_seq, ctx_mask)

    def step(carry, i):
        cache, token = carry
        logits, mutated = prior.apply(
            {"params": params, "cache": cache},
            token[:, None],
            ctx_seq,
            ctx_mask,
            positions=i[None],
            decode=True,
            mutable=["cache"],
        )
        code = _draw(
            jax.random.fold_in(rng, i),
            guidance.combine(logits[:, 0], batch, options.guidance),
            options,
        )
        token = jnp.tile(code, rows // batch)
        return (mutated["cache"], token), code

    start = jnp.full((rows,), prior.bos, jnp.int32)
    _, codes = jax.lax.scan(step, (cache, start), jnp.arange(prior.seq_len))
    return codes.T


def sample_codes_uncached(
    prior: CodePrior,
    params,
    text_seq: jax.Array,
    text_mask: jax.Array,
    null_seq: jax.Array,
    null_mask: jax.Array,
    rng: jax.Array,
    options: SamplingOptions,
) -> jax.Array:
    """The same draws as `sample_codes`, rerunning the whole sequence at every position."""
    batch = text_seq.shape[0]
    ctx_seq, ctx_mask = guidance.doubled(
        (text_seq, text_mask), (null_seq, null_mask), options.guidance
    )
    rows, n = ctx_seq.shape[0], prior.seq_len
    # buffer[:, :n] is the input [BOS, c_0, ..., c_{n-2}]; c_i is written at i + 1.
    buffer = jnp.full((rows, n + 1), prior.bos, jnp.int32)

    def step(buffer, i):
        logits = prior.apply({"params": params}, buffer[:, :n], ctx_seq, ctx_mask)
        row_logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
        code = _draw(
            jax.random.fold_in(rng, i),
            guidance.combine(row_logits, batch, options.guidance),
            options,
        )
        buffer = jax.lax.dynamic_update_slice(
            buffer, jnp.tile(code, rows // batch)[:, None], (0, i + 1)
        )
        return buffer, code

    _, codes = jax.lax.scan(step, buffer, jnp.arange(n))
    return codes.T
