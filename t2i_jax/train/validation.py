"""Validation during training, for methods that define it (e.g. the VAE's bits/dim).

A method opts in with two hooks of the contract (methods/base.py):
  validation_stats(params, batch, rng, frozen) -> arrays   sums over the batch (jit-compiled)
  validation_metrics(totals) -> dict[str, float]           from the sums over all batches
The loop calls the validator on the EMA parameters every `train.eval_every` steps and at
the end, on the first `train.eval_batches` batches of the validation split in file order,
with a fixed key: the numbers depend on the parameters alone, so a resumed run logs what an
uninterrupted one does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from t2i_jax import rng, sharding
from t2i_jax.errors import ConfigError
from t2i_jax.methods.base import Frozen, Method
from t2i_jax.train import input_pipeline

SPLIT = "validation"


def make_validator(
    method: Method,
    config: ml_collections.ConfigDict,
    builder,
    tokenizer,
    *,
    batch_sharding: jax.sharding.NamedSharding,
    features: Callable[[], object] = lambda: None,
    frozen: Frozen | None = None,
) -> Callable[[dict], dict[str, float]] | None:
    """params -> {"val_<name>": value}, or None when the method or config has no validation.

    `features` gives the split's text feature cache (frozen encoders), built only if used.
    """
    every = config.train.get("eval_every", 0)
    if not every or not method.offers("validation_stats"):
        return None
    num_batches = config.train.get("eval_batches", 0)
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(f"train.eval_batches must be a positive int, got {num_batches!r}")
    source = builder.as_data_source(SPLIT)
    if len(source) < config.train.batch_size:
        # An imported set with a small validation fraction: train on without validation.
        print(
            f"note: {config.data.name} {SPLIT} has {len(source)} examples, fewer than one "
            f"batch of {config.train.batch_size}: no validation metrics (train.eval_every)"
        )
        return None
    cached = features()
    replicated = sharding.replicated(batch_sharding.mesh)
    stats_fn = jax.jit(method.validation_stats, out_shardings=replicated)
    frozen = frozen or {}
    key = rng.stream_key(config.seed, "validation")

    def loader():
        return input_pipeline.make_loader(
            source,
            tokenizer,
            global_batch_size=config.train.batch_size,
            max_len=config.text.max_len,
            seed=0,  # unused: no shuffling
            shuffle=False,
            num_epochs=1,
            name=f"{config.data.name}/{SPLIT}",
            features=cached,
        )

    loader()  # a bad split fails now, not eval_every steps in

    def validate(params) -> dict[str, float]:
        totals: dict[str, np.ndarray] = {}
        for i, batch in enumerate(itertools.islice(iter(loader()), num_batches)):
            batch = input_pipeline.to_global(batch, batch_sharding)
            stats = sharding.to_host(stats_fn(params, batch, jax.random.fold_in(key, i), frozen))
            for name, value in stats.items():  # float64 on the host: exact enough to merge
                totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
        return {f"val_{k}": float(v) for k, v in method.validation_metrics(totals).items()}

    return validate
