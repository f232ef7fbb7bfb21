"""Optimizers from the config: AdamW, linear warm-up, cosine or constant decay, clipping,
and frozen parameter groups.

Freezing is an optimizer mask (big_vision style), never a separate code path: parameters
whose path ("text_encoder/layer_0/query/kernel") fully matches a frozen pattern get a zero
update and keep no optimizer state; clipping and weight decay see only the trained ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import ml_collections
import optax

from t2i_jax.errors import ConfigError


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = min(optim.warmup_steps, total_steps)
    if optim.schedule == "constant":
        decay = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, max(total_steps - warmup, 1), alpha=0.1)
    else:
        raise ConfigError(f"unknown optim.schedule '{optim.schedule}'; choose constant or cosine")
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, warmup), decay], boundaries=[warmup]
    )


def param_path(path: tuple) -> str:
    """'text_encoder/layer_0/query/kernel' for a key path of a params pytree (the same
    with or without the logical-axis boxes of `partitioning`, whose `.value` is skipped)."""
    keys = [k for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def compile_patterns(patterns: Sequence[str], key: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(
                f"config key '{key}': bad regular expression {pattern!r}: {e}"
            ) from None
    return compiled


def frozen_labels(params, patterns: Sequence[re.Pattern]):
    """'frozen' / 'trained' per leaf; a pattern that matches no parameter is an error."""
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in patterns:
        if not any(pattern.fullmatch(p) for p in paths):
            raise ConfigError(
                f"frozen pattern {pattern.pattern!r} matches no parameter (paths look like "
                f"{paths[0]!r})"
            )
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if any(r.fullmatch(param_path(p)) for r in patterns) else "trained",
        params,
    )


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, frozen: Sequence[str] = ()
) -> optax.GradientTransformation:
    """AdamW from `optim`; `frozen` patterns and `optim.freeze` (if set) mask parameters."""
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(
            learning_rate_schedule(optim, total_steps),
            b1=optim.b1,
            b2=optim.b2,
            weight_decay=optim.weight_decay,
        ),
    )
    user = [optim.freeze] if optim.get("freeze") else []
    patterns = compile_patterns([*frozen, *user], "optim.freeze")
    if not patterns:
        return tx
    return optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()},
        lambda params: frozen_labels(params, patterns),
    )
