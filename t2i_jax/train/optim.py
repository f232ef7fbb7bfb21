"""Optimizers from the config: AdamW, linear warm-up, cosine or constant decay, clipping."""

from __future__ import annotations

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


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(
            learning_rate_schedule(optim, total_steps),
            b1=optim.b1,
            b2=optim.b2,
            weight_decay=optim.weight_decay,
        ),
    )
