"""One seed decides everything: named random streams derived from `config.seed`.

`stream_key(seed, "noise")` is a jax key per stream; the key of a training step is
`fold_in(stream, step)`, so a resumed run draws exactly what an uninterrupted one draws.
`stream_seed` gives the integer seeds that numpy-side code (the data order) needs.
"""

from __future__ import annotations

import hashlib

import jax


def _stable_int(name: str) -> int:
    # Python's hash() is salted per process; a digest is stable across runs and hosts.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def stream_key(seed: int, name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), _stable_int(name))


def stream_seed(seed: int, name: str) -> int:
    """A 32-bit integer seed for a named stream (for grain / numpy)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def step_key(stream: jax.Array, step: int | jax.Array) -> jax.Array:
    return jax.random.fold_in(stream, step)
