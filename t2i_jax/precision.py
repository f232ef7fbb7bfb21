"""Mixed precision: which dtype the networks compute in and which the parameters are kept in.

`train.compute_dtype` is the dtype of every matmul and convolution (the networks' `dtype`
field); `train.param_dtype` is the dtype parameters are stored and updated in. Whatever the
two are, normalisation statistics (Flax reduces in float32), attention logits and softmax
(`layers.dot_product_attention`), the losses (networks return float32), the optimizer's
moments and update, and the EMA are float32: bfloat16 has 8 bits of mantissa, too few for
a running average whose step is 1e-3 of its value.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from t2i_jax.errors import ConfigError

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_named(name: str, key: str) -> Any:
    """The jnp dtype called `name`; a ConfigError naming `key` for any other."""
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r}: choose {', '.join(DTYPES)}")
    return DTYPES[name]


def cast(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of `tree` as `dtype` (integer leaves as they are)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )
