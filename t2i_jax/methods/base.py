"""The method protocol: how a generative family plugs into the one generic trainer.

A method owns its networks, optimizers and objective; the trainer owns the loop, the
mesh, data, checkpoints and logs. Everything a method returns is a pure function of its
arguments, so the trainer can jit it with shardings and donate the state.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax
import jax
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """All a run needs to continue, as one pytree of arrays.

    `params`, `ema_params` and `opt_state` are dicts keyed by network ("model" for
    diffusion; "generator" and "discriminator" for a GAN), so a family with several
    players and optimizers uses the same state, loop and checkpoints.
    """

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree


class Method(Protocol):
    """A generative family. `batch` follows the batch contract of DESIGN.md."""

    def init(self, rng: jax.Array, batch: dict) -> TrainState:
        """Initialises every network and optimizer state (batch gives shapes only)."""

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update (may update several players); returns scalar metrics."""

    def sample(self, params: PyTree, text: dict, rng: jax.Array, **options) -> jax.Array:
        """Images float32[B, H, W, 3] in [-1, 1] for text = {"tokens", "mask"}."""


def ema_update(ema: PyTree, params: PyTree, step: jax.Array, decay: float) -> PyTree:
    """EMA with the usual warm-up, (1 + step) / (10 + step), so short runs track too."""
    rate = jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(params, ema, 1.0 - rate)
