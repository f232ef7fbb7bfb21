"""The non-finite guard: a train step whose loss or gradients are NaN or Inf changes nothing.

`guard(train_step)` is the step the trainer compiles when `train.skip_nonfinite` is on (the
default). It runs the method's step, then keeps the old params, optimizer state and EMA
when any metric the step returns is non-finite: every family reports its losses and the
global norm of each player's gradients (`methods/base.gradient_update`), and a NaN or Inf
anywhere in a gradient makes its norm non-finite. The step counter still advances, as the
data iterator does, so a skipped step is a step with no update. The guard adds the metric
`NONFINITE` (1 on a skipped step), which the trainer takes out of the logged row.

With every value finite the kept state is the method's own output, bit for bit (a select,
no arithmetic), so a run with no bad step is the run without the guard. `Streak` is the
host side: it counts skipped steps in a row from the flags, one step behind the device so
the loop never waits for the step it just dispatched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

NONFINITE = "nonfinite"  # the guard's metric: 1 when the step was skipped


def guard(train_step: Callable) -> Callable:
    """`train_step(state, batch, key, frozen) -> (state, metrics)` that skips bad updates."""

    def guarded(state, batch, key, frozen):
        new_state, metrics = train_step(state, batch, key, frozen)
        values = [v for v in metrics.values() if jnp.issubdtype(v.dtype, jnp.inexact)]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        kept = kept.replace(step=new_state.step)
        return kept, {**metrics, NONFINITE: jnp.logical_not(finite).astype(jnp.int32)}

    return guarded


@dataclasses.dataclass
class Streak:
    """Skipped steps: in a row (since the last finite one) and in total."""

    total: int = 0
    in_a_row: int = 0
    first_bad_step: int | None = None  # of the current streak
    bad_metrics: tuple[str, ...] = ()  # the non-finite metrics of its latest step

    def record(self, step: int, metrics: dict) -> bool:
        """Reads one step's metrics (device arrays of that step); True if it was skipped."""
        if not int(metrics[NONFINITE]):
            self.in_a_row, self.first_bad_step = 0, None
            return False
        self.total += 1
        self.in_a_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        host = {k: float(v) for k, v in metrics.items() if k != NONFINITE}
        self.bad_metrics = tuple(sorted(k for k, v in host.items() if not math.isfinite(v)))
        return True

    @property
    def last_bad_step(self) -> int | None:
        if self.first_bad_step is None:
            return None
        return self.first_bad_step + self.in_a_row - 1

    def describe(self) -> str:
        what = ", ".join(self.bad_metrics) or "the update"
        return (
            f"{what} non-finite in {self.in_a_row} steps in a row "
            f"(steps {self.first_bad_step}-{self.last_bad_step})"
        )
